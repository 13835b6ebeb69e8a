"""Multi-view contrastive spatial embeddings, pretrained on a region, then tried as features in GLM, GAM and GBM.

    python -m experiments.spatial                              # default: California housing, CPU, ~15 min
    python -m experiments.spatial --prices my.csv --lon x --lat y --target price --covariates a,b,c
    python -m experiments.spatial --config paper pretrain.locations_csv=locs.csv views.tiles=tiles/ views.counts=osm.csv

Samples pretraining locations over the priced points' extent plus a margin (half uniform over land, half
near GeoNames places drawn by population, none within pretrain.min_gap degrees of a priced point), cuts
their views (hex map of places, population, airfields and land; raster tiles of land, Blue Marble, ETOPO and
elevation), pretrains SpatialModel contrastively through the core (resumable in WORKDIR/spatial), keeps
the encoder of the eval step with the lowest held-out contrastive loss (WORKDIR/spatial/best), embeds the
priced points with it, then compares feature sets {covariates, + lon/lat, + embedding, + both, + hand-made
view features} in GLMs, a GAM and a GBM under random, spatial-block and north/south splits
(experiments/spatial_downstream.py). Writes results.json, embedding_map.png and metrics.png into WORKDIR.
"""
from __future__ import annotations

import csv
import os
import sys
import time

import numpy as np

from experiments import harness
from experiments import spatial_downstream as ds
from experiments.configs.spatial import get_config
from jaxemb.data import spatial as views
from jaxemb.data.sources import ArraySource
from jaxemb.models.spatial import SpatialTask, check_lonlat

FEATURE_SETS = ("covariates", "+lonlat", "+embedding", "+both", "+views")
PAPER_NOTE = ("paper: arXiv 2511.17954 reports French real-estate prices only; none of its numbers is on this "
              "data, so no row has a comparable paper number (column 'paper' = n/a).")

# -- pretraining locations --------------------------------------------------------------------------------


def region_of(lonlat, margin: float):
    """(lon_min, lat_min, lon_max, lat_max) of the points plus `margin` degrees, clipped to the globe."""
    lo, hi = lonlat.min(0) - margin, lonlat.max(0) + margin
    return (max(lo[0], -180.0), max(lo[1], -90.0), min(hi[0], 180.0), min(hi[1], 90.0))


def _far_from(points, avoid, gap: float):
    """Mask of `points` with no `avoid` point within `gap` degrees (east-west scaled by cos latitude)."""
    from scipy.spatial import cKDTree
    if gap <= 0 or not len(avoid) or not len(points):
        return np.ones(len(points), bool)
    scale = np.cos(np.radians(np.mean(avoid[:, 1])))
    flat = lambda a: np.c_[a[:, 0] * scale, a[:, 1]]
    dist, _ = cKDTree(flat(avoid)).query(flat(points))
    return dist > gap


def sample_locations(region, n: int, avoid, p, seed: int):
    """n (lon, lat) locations in `region`: n // 2 uniform (by area) over land, the rest near GeoNames places
    with population >= p.min_population drawn by population (all uniform when the region has none). None
    lies within p.min_gap degrees of an `avoid` point. Returns (lonlat, near_place (n,) bool, counts)."""
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = region
    s0, s1 = np.sin(np.radians(y0)), np.sin(np.radians(y1))

    def uniform(m):
        got, tries = [], 0
        while sum(map(len, got)) < m:
            tries += 1
            cand = np.c_[rng.uniform(x0, x1, 4 * m), np.degrees(np.arcsin(rng.uniform(s0, s1, 4 * m)))]
            cand = cand[views.is_land(cand) & _far_from(cand, avoid, p.min_gap)]
            got.append(cand)
            if tries >= 20 and not sum(map(len, got)):
                raise ValueError(f"the pretraining region lon [{x0:.2f}, {x1:.2f}], lat [{y0:.2f}, {y1:.2f}] has "
                                 "no land (global-land-mask) away from the priced points")
        return np.concatenate(got)[:m]

    ll, pop, _ = views.places(p.min_population)
    inside = (ll[:, 0] >= x0) & (ll[:, 0] <= x1) & (ll[:, 1] >= y0) & (ll[:, 1] <= y1)
    ll, pop = ll[inside], pop[inside]
    n_pop = n - n // 2 if len(ll) else 0
    near, tries = [], 0
    while n_pop and sum(map(len, near)) < n_pop and tries < 50:
        tries += 1
        pick = rng.choice(len(ll), 2 * n_pop, p=pop / pop.sum())
        cand = ll[pick] + rng.normal(0, p.jitter, (2 * n_pop, 2))
        ok = (cand[:, 0] >= x0) & (cand[:, 0] <= x1) & (cand[:, 1] >= y0) & (cand[:, 1] <= y1)
        cand = cand[ok]
        near.append(cand[_far_from(cand, avoid, p.min_gap)])
    near = np.concatenate(near)[:n_pop] if near else np.zeros((0, 2))
    out = np.concatenate([uniform(n - len(near)), near])
    kind = np.arange(n) >= n - len(near)
    order = rng.permutation(n)
    return out[order], kind[order], {"uniform_land": n - len(near), "population_weighted": len(near),
                                     "places_in_region": int(inside.sum())}


def read_locations(path: str):
    """(ids, lonlat) from a CSV with columns id, lon, lat (users' own pretraining locations)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("id", "lon", "lat") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks columns {missing}; expected id, lon, lat")
        rows = list(reader)
    try:
        lonlat = np.array([[float(r["lon"]), float(r["lat"])] for r in rows])
    except ValueError as e:
        raise ValueError(f"{path}: non-numeric lon or lat ({e})") from None
    return [r["id"] for r in rows], check_lonlat(lonlat.reshape(-1, 2), path)


def view_arrays(lonlat, cfg, ids=None) -> dict:
    """The model's views at the pretraining locations: users' tiles/counts when given, else the package
    views. Map channels are scaled by their standard deviation over the disk cells."""
    v, out = cfg.views, {}
    if "image" in cfg.model.views:
        out["image"] = (views.load_tiles(v.tiles, ids) if v.tiles else
                        views.image_view(lonlat, v.tile, v.deg_per_px, tuple(v.layers.split(","))))
    if "map" in cfg.model.views:
        m = (views.load_counts(v.counts, ids, v.hex_radius) if v.counts else
             views.map_view(lonlat, v.hex_radius, v.hex_spacing, cfg.pretrain.min_population))
        cells = m[:, views.hex_disk_mask(v.hex_radius)]
        out["map"] = (m / np.maximum(cells.std(axis=(0, 1)), 1e-6)).astype(np.float32)
    return out


def pretraining_data(cfg, priced):
    p = cfg.pretrain
    if p.locations_csv:
        ids, locs = read_locations(p.locations_csv)
        given = [name for name, path in (("image", cfg.views.tiles), ("map", cfg.views.counts)) if path]
        if not given:
            raise ValueError("pretrain.locations_csv needs views.tiles (a folder of <id>.npy/.png tiles) and/or "
                             "views.counts (an OSM count CSV with id, q, r, channels)")
        cfg.model.views = tuple(given)
        info = {"user_locations": len(locs)}
    elif cfg.views.tiles or cfg.views.counts:
        raise ValueError("views.tiles / views.counts are keyed by location id: also give pretrain.locations_csv")
    else:
        ids = None
        locs, _, info = sample_locations(region_of(priced, p.margin), p.locations, priced, p, cfg.seed)
    arrays = {"lonlat": locs.astype(np.float32), **view_arrays(locs, cfg, ids)}
    n_valid = max(1, int(round(len(locs) * p.valid_fraction)))
    split = lambda sl: {k: a[sl] for k, a in arrays.items()}
    return split(slice(n_valid, None)), split(slice(0, n_valid)), dict(info, pretrain_locations=len(locs))


def kept_encoder(v, cfg):
    """(params, kept) of the encoder the study uses: the best-eval state in WORKDIR/spatial/best when
    train.best_metric is set and evals ran, else the last state. kept = {step, how, metric, value}."""
    t = cfg.train
    if t.best_metric and t.eval_every:
        state, meta = v.trainer.restore_best(v.result.state)
        return state["params"], {"step": int(meta["step"]), "how": f"best eval {meta['metric']} ({t.best_mode})",
                                 "metric": meta["metric"], "value": float(meta["value"])}
    return v.params, {"step": int(v.result.steps), "how": "last step", "metric": None, "value": None}


# -- hand-made view features (the reference row) ----------------------------------------------------------


def handmade_features(lonlat, cfg) -> np.ndarray:
    """Per point: the map view's disk mean and centre cell per channel, Blue Marble RGB and ETOPO colour
    and the elevation in km at the point (15 columns)."""
    k = cfg.views.hex_radius
    m = views.map_view(lonlat, k, cfg.views.hex_spacing, cfg.pretrain.min_population)
    disk = m[:, views.hex_disk_mask(k)].mean(1)
    rasters = [views.sample_raster(views.basemap_raster(r), lonlat) / 255.0 for r in ("rgb", "etopo")]
    km = views.elevation(lonlat)[:, None] / 1000
    return np.concatenate([disk, m[:, k, k], *rasters, km], 1).astype(np.float64)


# -- plots ------------------------------------------------------------------------------------------------


def embedding_map(path, task, params, region, grid: int, points):
    """The embedding's first 3 principal components as RGB on a lon/lat grid over the region (sea white),
    priced points as dots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x0, y0, x1, y1 = region
    lon, lat = np.meshgrid(np.linspace(x0, x1, grid), np.linspace(y1, y0, grid))
    ll = np.c_[lon.ravel(), lat.ravel()]
    e = task.embed(params, ll).astype(np.float64)
    e -= e.mean(0)
    pcs = e @ np.linalg.svd(e, full_matrices=False)[2][:3].T
    rgb = (pcs - pcs.min(0)) / np.maximum(np.ptp(pcs, 0), 1e-12)
    rgb[~views.is_land(ll)] = 1.0
    fig, ax = plt.subplots(figsize=(6, 6 * (y1 - y0) / max(x1 - x0, 1e-6) + 0.5))
    ax.imshow(rgb.reshape(grid, grid, 3), extent=(x0, x1, y0, y1), aspect="auto", interpolation="nearest")
    ax.scatter(points[:, 0], points[:, 1], s=0.2, c="k", alpha=0.2)
    ax.set(xlabel="longitude", ylabel="latitude", title="location embedding: PCs 1-3 as RGB (sea white)")
    harness.save_figure(fig, path)
    plt.close(fig)


def metric_bars(path, rows, models):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    schemes = list(dict.fromkeys(r["split"] for r in rows))
    fig, axes = plt.subplots(2, len(schemes), figsize=(5 * len(schemes), 7), squeeze=False)
    width = 0.8 / len(FEATURE_SETS)
    for j, split in enumerate(schemes):
        for i, metric in enumerate(("rmse", "gamma_deviance")):
            ax = axes[i, j]
            for f, name in enumerate(FEATURE_SETS):
                vals = [next(r[metric] for r in rows if (r["split"], r["model"], r["features"]) == (split, m, name))
                        for m in models]
                ax.bar(np.arange(len(models)) + (f - (len(FEATURE_SETS) - 1) / 2) * width, vals, width, label=name)
            ax.set_xticks(np.arange(len(models)), models, rotation=15)
            ax.set(title=f"{split}", ylabel="RMSE of log target" if metric == "rmse" else "mean Gamma deviance")
            ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=8)
    harness.save_figure(fig, path)
    plt.close(fig)


# -- study ------------------------------------------------------------------------------------------------


def kept_line(kept) -> str:
    if kept["metric"] is None:
        return f"step {kept['step']} (the last)"
    return f"step {kept['step']} (best eval {kept['metric']} {kept['value']:.4f})"


def pivot(rows, metric):
    out = []
    for split in dict.fromkeys(r["split"] for r in rows):
        for model in dict.fromkeys(r["model"] for r in rows):
            row = {"split": split, "model": model}
            row.update({f: next(r[metric] for r in rows if (r["split"], r["model"], r["features"]) == (split, model, f))
                        for f in FEATURE_SETS})
            out.append(dict(row, paper="n/a"))
    return out


OPTIONS = {"--prices": ("data.source", "priced-point CSV (default: California housing)"),
           "--lon": ("data.lon", "longitude column"), "--lat": ("data.lat", "latitude column"),
           "--target": ("data.target", "positive target column (modelled on the log scale)"),
           "--covariates": ("data.covariates", "comma-separated covariate columns (a/b: a ratio)")}


def main(argv=None) -> dict:
    args, cfg = harness.parse(sys.argv[1:] if argv is None else argv, __doc__.splitlines()[0], get_config,
                              "runs/spatial", options=OPTIONS)
    t0 = time.time()
    d, dc = cfg.data, cfg.downstream
    models = [m.strip() for m in dc.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ds.MODELS]
    if unknown or not models:
        raise ValueError(f"downstream.models={dc.models!r}: expected names from {', '.join(ds.MODELS)}")
    prices = ds.read_prices(d.source, d.lon, d.lat, d.target, d.covariates)
    if 0 < d.max_rows < len(prices["y"]):
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(prices["y"]), d.max_rows, replace=False))
        prices.update({k: prices[k][keep] for k in ("lonlat", "y", "X")})
    schemes = ds.splits(prices["lonlat"], dc)
    train, valid, derived = pretraining_data(cfg, prices["lonlat"])
    derived.update(priced_points=len(prices["y"]), priced_rows_dropped=prices["dropped"],
                   views_seconds=round(time.time() - t0, 1))
    task = SpatialTask(cfg.model)
    b = cfg.train.batch_size
    if cfg.pretrain.epochs:
        cfg.train.steps = max(1, cfg.pretrain.epochs * len(train["lonlat"]) // b)
    v = harness.train_variant("spatial", task, cfg, args.workdir,
                              ArraySource(train, b, seed=cfg.seed, shuffle=True, drop_last=True,
                                          what="pretraining locations"),
                              ArraySource(valid, min(b, len(valid["lonlat"]))) if cfg.train.eval_every else None)
    params, kept = kept_encoder(v, cfg)
    derived["kept"] = kept
    held_out = ArraySource(valid, b)
    ev = v.trainer.evaluate(params, held_out, held_out.num_batches)  # all held-out locations, kept encoder
    emb = task.embed(params, prices["lonlat"]).astype(np.float64)
    ll, X = prices["lonlat"], prices["X"]
    feats = dict(zip(FEATURE_SETS, (X, np.c_[X, ll], np.c_[X, emb], np.c_[X, ll, emb],
                                    np.c_[X, handmade_features(ll, cfg)])))
    t1 = time.time()
    rows = ds.evaluate(feats, prices["y"], schemes, models, dc, log=print if cfg.train.progress else None)
    derived.update(downstream_seconds=round(time.time() - t1, 1),
                   folds={k: [len(te) for _, te in f] for k, f in schemes.items()})
    tables = {m: pivot(rows, m) for m in ("rmse", "r2", "gamma_deviance")}
    what = {"rmse": "RMSE of log target", "r2": "R^2 of log target", "gamma_deviance": "mean Gamma deviance"}
    for m, t in tables.items():
        harness.print_table(t, f"{what[m]}, test folds ({d.target}; {len(prices['y'])} points; encoder of "
                               f"{kept_line(kept)})", width=11, fmt=".4f")
    print(PAPER_NOTE)
    print(f"pretraining: {derived['pretrain_locations']} locations, {v.result.steps} steps; {kept_line(kept)}; "
          f"all held-out locations: contrastive loss {ev['loss']:.3f}, retrieval accuracy {ev['accuracy']:.3f} "
          f"(batch {b}, chance loss {np.log(b):.3f})")
    region = region_of(ll, cfg.pretrain.margin)
    embedding_map(os.path.join(args.workdir, "embedding_map.png"), task, params, region, dc.map_grid, ll)
    metric_bars(os.path.join(args.workdir, "metrics.png"), rows, models)
    derived["total_seconds"] = round(time.time() - t0, 1)
    results = {"rows": rows, "tables": tables, "pretrain_eval": ev, "kept": kept,
               "train_seconds": v.result.train_seconds,
               "paper": PAPER_NOTE, "data": d.source, "region": region}
    results = harness.write_results(args.workdir, "results.json", results, cfg, derived)
    print(f"\nresults: {os.path.abspath(args.workdir)}  (results.json, embedding_map.png, metrics.png)")
    return results


if __name__ == "__main__":
    harness.run_cli(main)
