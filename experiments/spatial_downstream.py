"""The downstream half of `experiments.spatial`: priced points -> GLM, GAM and GBM with spatial feature sets
under random, spatial-block and held-out-region cross-validation.

Models (every one sees the same standardised feature matrix):
  glm_gaussian  Gaussian GLM (identity link) on log(target)            statsmodels
  glm_gamma     Gamma GLM with log link on the target                  statsmodels
  gam           Gaussian GAM on log(target): a cubic B-spline smooth   statsmodels GLMGam + BSplines
                per continuous feature (second-derivative penalty)
  gbm           gradient-boosted trees on log(target)                  LightGBM
Features are clipped to their training quantiles [q, 1 - q] (downstream.clip_quantile: a few extreme
ratios would otherwise dominate the linear models) and standardised on the training rows.
Metrics on the test rows: RMSE and R^2 of log(target) (the Gamma GLM's log mean), and the mean Gamma
deviance of the target (the log-scale models predict exp(prediction)). So test features never leave the
training range (the GAM's splines are continued as constants).
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np

from jaxemb.models.spatial import check_lonlat

MODELS = ("glm_gaussian", "glm_gamma", "gam", "gbm")


# -- priced points ----------------------------------------------------------------------------------------


def _numbers(rows, col, path, allow_missing):
    out = np.empty(len(rows))
    for i, row in enumerate(rows):
        text = row[col].strip()
        if text == "" or text.lower() in ("na", "nan"):
            if not allow_missing:
                raise ValueError(f"{path}: column {col!r} is empty or NaN at data row {i + 1}; coordinates "
                                 "must be present on every row")
            out[i] = np.nan
            continue
        try:
            out[i] = float(text)
        except ValueError:
            raise ValueError(f"{path}: column {col!r} is not numeric (data row {i + 1}: {text!r})") from None
    return out


def read_prices(path: str, lon: str, lat: str, target: str, covariates) -> dict:
    """Columns of a priced-point CSV. `covariates`: names (a list or 'a,b,c'); 'a/b' is the ratio of two
    columns (e.g. total_rooms/households). Rows with a missing target or covariate are dropped (counted);
    coordinates must be present, numeric and in range, the target positive.
    Returns dict(lonlat (N, 2), y (N,), X (N, C), names, dropped)."""
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file or directory (the priced-point CSV)", path)
    names = [c.strip() for c in (covariates.split(",") if isinstance(covariates, str) else covariates) if c.strip()]
    if not names:
        raise ValueError("no covariates given; expected --covariates a,b,c (column names, or a/b for a ratio)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        rows = list(reader)
    needed = [lon, lat, target] + [p for c in names for p in c.split("/")]
    missing = sorted({c for c in needed if c not in header})
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; its columns are {header}")
    if not rows:
        raise ValueError(f"{path} has a header but no data rows")
    col = lambda c, miss=True: _numbers(rows, c, path, miss)
    lonlat = check_lonlat(np.c_[col(lon, False), col(lat, False)], f"{path} (lon={lon!r}, lat={lat!r})")
    y = col(target)
    X = []
    for c in names:
        parts = c.split("/")
        if len(parts) > 2:
            raise ValueError(f"covariate {c!r}: expected a column name or a ratio a/b")
        X.append(col(parts[0]) / col(parts[1]) if len(parts) == 2 else col(parts[0]))
    X = np.stack(X, 1)
    keep = np.isfinite(y) & np.isfinite(X).all(1)
    if not keep.any():
        raise ValueError(f"{path}: every row has a missing target or covariate")
    if (y[keep] <= 0).any():
        raise ValueError(f"{path}: target {target!r} has {int((y[keep] <= 0).sum())} values <= 0; the log and "
                         "Gamma models need a positive target")
    return dict(lonlat=lonlat[keep], y=y[keep], X=X[keep], names=names, dropped=int((~keep).sum()))


# -- cross-validation splits ------------------------------------------------------------------------------


def random_folds(n: int, k: int, seed: int) -> list:
    """[(train idx, test idx)] of k folds of a random permutation."""
    fold = np.random.default_rng(seed).permutation(n) % k
    return [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(k)]


def block_ids(lonlat, block_deg: float) -> np.ndarray:
    """One integer per row: its block_deg x block_deg degree cell."""
    cell = np.floor(np.asarray(lonlat) / block_deg).astype(np.int64)
    return cell[:, 0] * 1_000_003 + cell[:, 1]


def block_folds(lonlat, k: int, block_deg: float, seed: int) -> list:
    """k folds of whole blocks (a block is never split between folds): blocks in a random order, each to
    the fold with the fewest rows so far."""
    ids = block_ids(lonlat, block_deg)
    blocks, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if len(blocks) < k:
        raise ValueError(f"the points fall in {len(blocks)} blocks of {block_deg} degrees, fewer than the {k} "
                         "folds; use smaller downstream.block_deg")
    fold_of, size = np.empty(len(blocks), np.int64), np.zeros(k)
    for b in np.random.default_rng(seed).permutation(len(blocks)):
        fold_of[b] = int(np.argmin(size))
        size[fold_of[b]] += counts[b]
    fold = fold_of[inverse]
    return [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(k)]


def region_split(lonlat, south_fraction: float) -> list:
    """[(train idx, test idx)]: train on the points north of the south_fraction latitude quantile, test on
    the rest (the south)."""
    if not 0 < south_fraction < 1:
        raise ValueError(f"downstream.south_fraction={south_fraction}: expected a number in (0, 1)")
    lat = np.asarray(lonlat)[:, 1]
    cut = np.quantile(lat, south_fraction)
    return [(np.flatnonzero(lat > cut), np.flatnonzero(lat <= cut))]


def splits(lonlat, c) -> dict:
    """The three schemes of downstream config c (folds, block_deg, south_fraction, seed)."""
    return {"random": random_folds(len(lonlat), c.folds, c.seed),
            "spatial_block": block_folds(lonlat, c.folds, c.block_deg, c.seed),
            "north_south": region_split(lonlat, c.south_fraction)}


# -- models -----------------------------------------------------------------------------------------------


def _standardise(train, test, q: float = 0.0):
    """Both clipped to the train columns' [q, 1 - q] quantiles, then scaled by the train mean and sd."""
    if q > 0:
        lo, hi = np.quantile(train, [q, 1 - q], axis=0)
        train, test = np.clip(train, lo, hi), np.clip(test, lo, hi)
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return (train - mu) / sd, (test - mu) / sd


def fit_predict(model: str, Xtr, ytr, Xte, c) -> np.ndarray:
    """Predicted target means (price scale) at Xte of `model` fitted on (Xtr, ytr)."""
    from statsmodels.genmod import families
    from statsmodels.genmod.generalized_linear_model import GLM
    Xtr, Xte = _standardise(Xtr, Xte, c.clip_quantile)
    ones = lambda a: np.c_[np.ones(len(a)), a]
    if model == "glm_gaussian":
        return np.exp(GLM(np.log(ytr), ones(Xtr), family=families.Gaussian()).fit().predict(ones(Xte)))
    if model == "glm_gamma":
        fam = families.Gamma(families.links.Log())
        return GLM(ytr, ones(Xtr), family=fam).fit().predict(ones(Xte))
    if model == "gam":
        from statsmodels.gam.api import BSplines, GLMGam
        smooth = np.array([len(np.unique(x)) > c.gam_df + 2 for x in Xtr.T])
        lin_tr, lin_te = ones(Xtr[:, ~smooth]), ones(Xte[:, ~smooth])
        if not smooth.any():
            return np.exp(GLM(np.log(ytr), lin_tr).fit().predict(lin_te))
        s_tr = Xtr[:, smooth]
        s_te = np.clip(Xte[:, smooth], s_tr.min(0), s_tr.max(0))
        k = int(smooth.sum())
        bs = BSplines(s_tr, df=[c.gam_df] * k, degree=[3] * k)
        fit = GLMGam(np.log(ytr), exog=lin_tr, smoother=bs, alpha=np.full(k, c.gam_alpha)).fit()
        return np.exp(fit.predict(exog=lin_te, exog_smooth=s_te))
    if model == "gbm":
        import lightgbm as lgb
        params = dict(objective="regression", learning_rate=c.gbm_lr, num_leaves=c.gbm_leaves,
                      min_data_in_leaf=20, num_threads=1, seed=c.seed, verbose=-1, force_col_wise=True)
        booster = lgb.train(params, lgb.Dataset(Xtr, np.log(ytr)), c.gbm_rounds)
        return np.exp(booster.predict(Xte))
    raise ValueError(f"unknown downstream model {model!r}; expected one of {', '.join(MODELS)}")


def metrics(y, mu) -> dict:
    """RMSE and R^2 of log y against log mu, and the mean Gamma deviance of y against mu."""
    ly, lm = np.log(y), np.log(np.maximum(mu, 1e-300))
    sse = float(np.sum((ly - lm) ** 2))
    r = y / mu
    return {"rmse": math.sqrt(sse / len(y)), "r2": 1 - sse / float(np.sum((ly - ly.mean()) ** 2)),
            "gamma_deviance": float(np.mean(2 * (r - 1 - np.log(r))))}


def evaluate(features: dict, y, schemes: dict, models, c, log=None) -> list:
    """Rows {split, model, features, rmse, r2, gamma_deviance, folds (per-fold metrics)}: every model on
    every feature set (name -> (N, F) matrix) under every scheme (name -> [(train, test)]). Fold metrics
    are averaged with equal weight."""
    rows = []
    for split, folds in schemes.items():
        for model in models:
            for name, X in features.items():
                per = [metrics(y[te], fit_predict(model, X[tr], y[tr], X[te], c)) for tr, te in folds]
                row = {"split": split, "model": model, "features": name}
                row.update({m: float(np.mean([p[m] for p in per])) for m in per[0]})
                rows.append(dict(row, folds=per))
                if log:
                    log(f"{split:>13} {model:>12} {name:>12}  rmse {row['rmse']:.4f}  r2 {row['r2']:.3f}")
    return rows
