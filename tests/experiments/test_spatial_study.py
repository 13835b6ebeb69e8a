import json
import os

import ml_collections
import numpy as np
import pytest

from experiments import spatial, spatial_downstream as ds
from experiments.configs.spatial import get_config
from cli_check import assert_usage_error

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def _downstream(**kw):
    c = ml_collections.ConfigDict(get_config("tiny").downstream.to_dict())
    c.update(kw)
    return c


def _write_csv(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")


# -- downstream pipeline ----------------------------------------------------------------------------------


def test_embedding_of_a_planted_spatial_effect_beats_raw_coordinates_in_a_glm():
    """log y = 1 + 0.4 x + f(lon, lat) + noise with a bumpy f that no linear function of (lon, lat)
    follows; an 'embedding' holding f (plus a useless column) recovers the noise level, raw coordinates
    do not."""
    rng = np.random.default_rng(0)
    n = 1200
    ll = np.c_[rng.uniform(-3, 3, n), rng.uniform(40, 46, n)]
    f = np.sin(2 * ll[:, 0]) * np.cos(2 * ll[:, 1])
    x = rng.normal(size=(n, 1))
    y = np.exp(1 + 0.4 * x[:, 0] + f + rng.normal(0, 0.1, n))
    emb = np.c_[f, rng.normal(size=n)]
    feats = {"+lonlat": np.c_[x, ll], "+embedding": np.c_[x, emb]}
    schemes = {"random": ds.random_folds(n, 4, 0)}
    rows = ds.evaluate(feats, y, schemes, ["glm_gaussian"], _downstream(clip_quantile=0.0))
    by = {r["features"]: r for r in rows}
    assert by["+embedding"]["rmse"] < 0.12 and by["+embedding"]["r2"] > 0.95
    assert by["+lonlat"]["rmse"] > 0.5 > by["+embedding"]["rmse"] * 4
    assert by["+embedding"]["gamma_deviance"] < by["+lonlat"]["gamma_deviance"] / 10
    # the Gaussian GLM is least squares on the standardised features (float64 reference)
    tr, te = schemes["random"][0]
    mu = ds.fit_predict("glm_gaussian", emb[tr], y[tr], emb[te], _downstream(clip_quantile=0.0))
    z = (emb - emb[tr].mean(0)) / emb[tr].std(0)
    beta = np.linalg.lstsq(np.c_[np.ones(len(tr)), z[tr]], np.log(y[tr]), rcond=None)[0]
    np.testing.assert_allclose(np.log(mu), np.c_[np.ones(len(te)), z[te]] @ beta, rtol=1e-9, atol=1e-9)


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(1)
    y, mu = rng.uniform(1, 5, 50), rng.uniform(1, 5, 50)
    m = ds.metrics(y, mu)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((np.log(y) - np.log(mu)) ** 2)), rel=1e-12)
    ly = np.log(y)
    assert m["r2"] == pytest.approx(1 - np.sum((ly - np.log(mu)) ** 2) / np.sum((ly - ly.mean()) ** 2), rel=1e-12)
    assert m["gamma_deviance"] == pytest.approx(np.mean(2 * (-np.log(y / mu) + (y - mu) / mu)), rel=1e-12)
    assert ds.metrics(y, y)["gamma_deviance"] == 0 and ds.metrics(y, y)["rmse"] == 0


def test_every_model_predicts_finite_positive_means_near_the_target():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 3))
    y = np.exp(2 + X @ [0.3, -0.2, 0.1] + rng.normal(0, 0.05, 400))
    for model in ds.MODELS:
        mu = ds.fit_predict(model, X[:300], y[:300], X[300:], _downstream(gbm_rounds=60))
        assert np.isfinite(mu).all() and (mu > 0).all(), model
        assert ds.metrics(y[300:], mu)["r2"] > 0.7, model
    with pytest.raises(ValueError, match="unknown downstream model 'svm'"):
        ds.fit_predict("svm", X, y, X, _downstream())


# -- splitters --------------------------------------------------------------------------------------------


def test_cv_splitters_partition_the_rows_blocks_never_straddle_folds_and_the_region_split_is_north_south():
    rng = np.random.default_rng(3)
    ll = np.c_[rng.uniform(-124, -114, 3000), rng.uniform(32, 42, 3000)]
    for folds in (ds.random_folds(len(ll), 5, 0), ds.block_folds(ll, 5, 0.5, 0)):
        assert len(folds) == 5
        tests = np.concatenate([te for _, te in folds])
        assert np.array_equal(np.sort(tests), np.arange(len(ll)))  # every row tested exactly once
        for tr, te in folds:
            assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(ll)
    ids = ds.block_ids(ll, 0.5)
    folds = ds.block_folds(ll, 5, 0.5, 0)
    for tr, te in folds:
        assert not set(ids[tr]) & set(ids[te])  # a block lies wholly in one fold
        assert 0.15 < len(te) / len(ll) < 0.25  # balanced by rows
    same = np.floor(ll / 0.5)
    i, j = np.flatnonzero((same == same[0]).all(1))[:2]
    fold_of = np.empty(len(ll), int)
    for k, (_, te) in enumerate(folds):
        fold_of[te] = k
    assert fold_of[i] == fold_of[j]
    [(tr, te)] = ds.region_split(ll, 0.3)
    assert ll[te, 1].max() < ll[tr, 1].min()  # test wholly south of train
    assert abs(len(te) / len(ll) - 0.3) < 0.01 and len(tr) + len(te) == len(ll)
    with pytest.raises(ValueError, match="fewer than the 5 folds"):
        ds.block_folds(ll[:3], 5, 0.5, 0)
    with pytest.raises(ValueError, match="south_fraction"):
        ds.region_split(ll, 1.5)


# -- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,args,msg", [
    ([[-120, 35, 100, 1]], dict(covariates="a,zz"), r"no column\(s\) \['zz'\]"),
    ([[-120, 35, 100, "high"]], {}, "column 'a' is not numeric \\(data row 1: 'high'\\)"),
    ([[-120, 95, 100, 1]], {}, r"latitudes \(column 1\) outside \[-90, 90\]"),
    ([[-200, 35, 100, 1]], {}, r"longitudes \(column 0\) outside \[-180, 180\]"),
    ([[35, -120, 100, 1], [36, -121, 50, 2]], {}, "look swapped"),
    ([[-120, "", 100, 1]], {}, "column 'y' is empty or NaN at data row 1"),
    ([[-120, "nan", 100, 1]], {}, "column 'y' is empty or NaN"),
    ([[-120, 35, -5, 1]], {}, "values <= 0"),
])
def test_bad_priced_csv_is_refused_naming_the_problem(tmp_path, rows, args, msg):
    path = tmp_path / "p.csv"
    _write_csv(path, ["x", "y", "price", "a"], rows)
    kw = dict(lon="x", lat="y", target="price", covariates="a")
    kw.update(args)
    with pytest.raises(ValueError, match=msg):
        ds.read_prices(str(path), **kw)


def test_read_prices_ratios_and_dropped_rows(tmp_path):
    path = tmp_path / "p.csv"
    _write_csv(path, ["x", "y", "price", "a", "b"], [[-120, 35, 100, 6, 3], [-121, 36, 50, "", 2], [-122, 37, 70, 1, 4]])
    p = ds.read_prices(str(path), "x", "y", "price", "a/b,b")
    assert p["dropped"] == 1 and p["names"] == ["a/b", "b"]
    np.testing.assert_array_equal(p["lonlat"], [[-120, 35], [-122, 37]])
    np.testing.assert_allclose(p["X"], [[2, 3], [0.25, 4]])


def test_cli_reports_a_bad_prices_file_in_one_line(tmp_path):
    path = tmp_path / "p.csv"
    _write_csv(path, ["x", "y", "price"], [[-120, 35, 100]])
    assert_usage_error("experiments.spatial", ["--config", "tiny", "--workdir", str(tmp_path / "w"), "--prices",
                                               str(path), "--lon", "x", "--lat", "y", "--target", "price",
                                               "--covariates", "income"], "no column(s) ['income']")


# -- pretraining locations and the whole study ------------------------------------------------------------


def test_pretraining_locations_half_on_land_half_near_places_none_at_priced_points():
    cfg = get_config("tiny")
    rng = np.random.default_rng(4)
    priced = np.c_[rng.uniform(-122.5, -121.9, 400), rng.uniform(37.3, 37.9, 400)]
    region = spatial.region_of(priced, 0.3)
    locs, near, info = spatial.sample_locations(region, 200, priced, cfg.pretrain, 0)
    assert locs.shape == (200, 2) and info["uniform_land"] == info["population_weighted"] == 100 == near.sum()
    assert ((locs >= region[:2]) & (locs <= region[2:])).all()
    assert spatial._far_from(locs, priced, cfg.pretrain.min_gap).all()
    from jaxemb.data import spatial as views
    assert views.is_land(locs[~near]).all()
    places, pop, _ = views.places(cfg.pretrain.min_population)
    gap = np.abs(locs[near][:, None] - places[None]).max(-1).min(1)  # to the nearest place, degrees
    assert (gap < 6 * cfg.pretrain.jitter).all() and np.median(gap) < 2 * cfg.pretrain.jitter
    uniform_gap = np.abs(locs[~near][:, None] - places[None]).max(-1).min(1)
    assert np.median(uniform_gap) > np.median(gap)
    with pytest.raises(ValueError, match="has no land"):
        spatial.sample_locations((-150.0, -10.0, -149.0, -9.0), 10, priced, cfg.pretrain, 0)  # open Pacific


@pytest.fixture
def small_views(monkeypatch):
    """Small stand-ins for the package rasters and point sets (the real ones are tested in
    tests/data/test_spatial_views.py and take seconds to load): land east of lon -122.5 on a 0.1 degree
    raster (100 m high), a smooth colour raster, 30 places and 10 airfields near the San Francisco Bay."""
    from jaxemb.data import spatial as views
    lat = 90 - (np.arange(1800) + 0.5) / 10
    lon = -180 + (np.arange(3600) + 0.5) / 10
    land = np.broadcast_to(lon[None] > -122.5, (1800, 3600)) & (np.abs(lat) < 80)[:, None]
    colour = (np.stack(np.meshgrid(lon, lat), -1) * 10 % 256).astype(np.uint8)
    colour = np.concatenate([colour, colour[..., :1]], -1)
    rng = np.random.default_rng(6)
    pl = np.c_[rng.uniform(-122.4, -121.4, 30), rng.uniform(37.2, 38.2, 30)]
    pop = rng.uniform(1e3, 1e5, 30)
    monkeypatch.setattr(views, "land_mask", lambda: land)
    monkeypatch.setattr(views, "basemap_raster", lambda name: colour)
    monkeypatch.setattr(views, "elevation_raster", lambda: np.where(land, 100.0, 0.0).astype(np.float32))
    monkeypatch.setattr(views, "places", lambda min_population=15000: (pl, pop, ["p"] * 30))
    monkeypatch.setattr(views, "airfields", lambda: pl[:10] + 0.01)


def test_tiny_study_on_priced_points_writes_results_and_pngs(tmp_path, capsys, small_views):
    rng = np.random.default_rng(5)
    n = 240
    ll = np.c_[rng.uniform(-122.4, -121.4, n), rng.uniform(37.2, 38.2, n)]
    a = rng.normal(size=n)
    price = np.exp(12 + 0.3 * a + np.sin(4 * ll[:, 0]) * 0.5 + rng.normal(0, 0.1, n))
    path = tmp_path / "prices.csv"
    _write_csv(path, ["x", "y", "price", "a", "b"], [[*ll[i], price[i], a[i], 1 + i % 3] for i in range(n)])
    wd = tmp_path / "run"
    argv = ["--config", "tiny", "--workdir", str(wd), "--prices", str(path), "--lon", "x", "--lat", "y",
            "--target", "price", "--covariates", "a,b", "train.progress=False", "pretrain.locations=160",
            "downstream.models=glm_gaussian,gbm", "downstream.block_deg=0.25",
            "optim.lr=0.1"]  # this high rate makes step 3's eval loss beat the last step's (6)
    res = spatial.main(argv)
    out = capsys.readouterr().out
    assert "RMSE of log target" in out and "+embedding" in out and "n/a" in out and "2511.17954" in out
    saved = json.load(open(wd / "results.json"))
    combos = {(r["split"], r["model"], r["features"]) for r in saved["rows"]}
    assert combos == {(s, m, f) for s in ("random", "spatial_block", "north_south")
                      for m in ("glm_gaussian", "gbm") for f in spatial.FEATURE_SETS}
    for r in saved["rows"]:
        assert np.isfinite([r["rmse"], r["r2"], r["gamma_deviance"]]).all() and r["rmse"] > 0
    assert saved["derived"]["priced_points"] == n and saved["derived"]["pretrain_locations"] == 160
    assert saved["config"]["data"]["source"] == str(path) and saved["config"]["data"]["target"] == "price"
    assert len(saved["tables"]["rmse"]) == 6 and saved["tables"]["rmse"][0]["paper"] == "n/a"
    # the study's encoder is the one of an eval step with the least eval loss (tiny: evals at steps 3 and 6)
    from jaxemb.train.metrics import read_metrics
    evals = read_metrics(str(wd / "spatial" / "metrics.jsonl"), "eval")
    assert [r["step"] for r in evals] == [3, 6]
    kept, best = saved["kept"], min(r["loss"] for r in evals)
    assert kept["metric"] == "loss" and kept["step"] in [r["step"] for r in evals if r["loss"] == best]
    assert kept["value"] == pytest.approx(best, rel=1e-6) and saved["derived"]["kept"] == kept
    # the held-out set is one eval batch here, so the study's own eval of its encoder is the kept step's
    assert saved["pretrain_eval"]["loss"] == pytest.approx(kept["value"], rel=1e-5)
    assert f"step {kept['step']} (best eval loss {kept['value']:.4f})" in out
    for png in ("embedding_map.png", "metrics.png"):
        assert (wd / png).stat().st_size > 5000
    again = spatial.main(argv)  # finished: restores the kept encoder, same study
    assert again["rows"] == res["rows"] and again["kept"] == kept
