"""Regression metrics in numpy float64: Spearman, Pearson, RMSE and the ppiseq error bar on Spearman.

All take two equal-length 1-D arrays (true, predicted) and return a Python float. A constant input has no
defined correlation and gives nan (as scipy does).
"""
from __future__ import annotations

import numpy as np


def _pair(y_true, y_pred, least: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(y_true, np.float64).ravel(), np.asarray(y_pred, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"y_true has {a.size} values and y_pred {b.size}; expected the same number")
    if a.size < least:
        raise ValueError(f"need at least {least} values, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("y_true / y_pred hold nan or inf")
    return a, b


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (scipy.stats.rankdata's default 'average')."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # first index of each run of equal values, and each run's average rank
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(y_true, y_pred) -> float:
    a, b = _pair(y_true, y_pred)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def spearman(y_true, y_pred) -> float:
    a, b = _pair(y_true, y_pred)
    return pearson(rankdata(a), rankdata(b))


def rmse(y_true, y_pred) -> float:
    a, b = _pair(y_true, y_pred, least=1)
    return float(np.sqrt(np.mean((a - b) ** 2)))


def spearman_error_bar(rho: float, n: int) -> float:
    """The reference's standard error of a Spearman rho over n points:
    sqrt((1 - rho^2)^2 (1 + rho^2 / 2) / (n - 3))."""
    if n <= 3:
        raise ValueError(f"the error bar needs n > 3 points, got n={n}")
    r2 = float(rho) ** 2
    return float(np.sqrt((1.0 - r2) ** 2 * (1.0 + r2 / 2.0) / (n - 3)))


def regression_report(y_true, y_pred) -> dict:
    """{'spearman', 'spearman_err', 'pearson', 'rmse', 'n'} for one test set."""
    rho = spearman(y_true, y_pred)
    n = int(np.asarray(y_true).size)
    return {"spearman": rho, "spearman_err": spearman_error_bar(rho, n) if n > 3 else float("nan"),
            "pearson": pearson(y_true, y_pred), "rmse": rmse(y_true, y_pred), "n": n}
