"""Bootstrap confidence intervals for rating errors: pure functions, arrays in, numbers out (numpy only).

Every function takes per-row *signed errors* (prediction - label), one per evaluated row, and a statistic:
`mae` (mean |e|) or `rmse` (sqrt(mean e^2)).

- `bootstrap_ci`: the percentile bootstrap over rows. Draw `resamples` sets of n row indices with replacement
  (a fixed seed: the same numbers on every call), compute the statistic on each, and take the
  (1 - level) / 2 and (1 + level) / 2 percentiles (numpy's default linear interpolation) as the interval.
- `paired_bootstrap`: the difference model - baseline measured on the same rows. Each resample draws one
  set of row indices and uses it for *both* error arrays, so the interval reflects how much the difference
  varies with the rows, not how much each figure does on its own (row difficulty cancels out). The verdict
  is "better" when the whole interval lies below 0 (the model's error is lower), "worse" when it lies above
  0, "not distinguishable" otherwise (the interval touches or contains 0).

Resamples are drawn in chunks, so memory stays small on large splits (at most ~4M resampled values at once).
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
STATISTICS = ("mae", "rmse")
VERDICTS = ("better", "worse", "not distinguishable")
_CHUNK = 256
_CELLS = 4_000_000  # at most this many resampled values in memory at once (32 MB)


def _check(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


def error_statistic(errors, statistic: str = "mae") -> float:
    """MAE or RMSE of signed errors; nan for no rows."""
    _check(statistic)
    e = np.asarray(errors, dtype=np.float64)
    if e.size == 0:
        return float("nan")
    return float(np.mean(np.abs(e))) if statistic == "mae" else float(np.sqrt(np.mean(e * e)))


def _resampled(errors: np.ndarray, statistic: str, resamples: int, seed: int) -> np.ndarray:
    """The statistic on each of `resamples` bootstrap resamples of the rows; a 2-D `errors` (k, n) gives a
    (k, resamples) array whose columns used the same row indices for every one of the k error arrays."""
    errors = np.atleast_2d(errors)
    n = errors.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty((errors.shape[0], resamples), dtype=np.float64)
    transformed = np.abs(errors) if statistic == "mae" else errors * errors
    chunk = max(1, min(_CHUNK, _CELLS // max(errors.size, 1)))
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means = transformed[:, idx].mean(axis=2)  # (k, chunk)
        values[:, start:stop] = means if statistic == "mae" else np.sqrt(means)
    return values


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_ci(errors, statistic: str = "mae", resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float, float]:
    """(value on all rows, interval low, interval high): the percentile bootstrap over rows. nan x 3 for no rows."""
    _check(statistic)
    e = np.asarray(errors, dtype=np.float64).ravel()
    if e.size == 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = _interval(_resampled(e, statistic, resamples, seed)[0], level)
    return error_statistic(e, statistic), lo, hi


def verdict(lo: float, hi: float) -> str:
    """The verdict of a model-minus-baseline interval: below 0 = better, above 0 = worse."""
    if hi < 0:
        return "better"
    if lo > 0:
        return "worse"
    return "not distinguishable"


def paired_bootstrap(model_errors, baseline_errors, statistic: str = "mae", resamples: int = RESAMPLES,
                     seed: int = SEED, level: float = LEVEL) -> dict:
    """statistic(model) - statistic(baseline) on the same rows, with its paired-bootstrap interval.

    Returns {"diff", "lo", "hi", "verdict"}; the two arrays must be aligned row by row."""
    _check(statistic)
    m = np.asarray(model_errors, dtype=np.float64).ravel()
    b = np.asarray(baseline_errors, dtype=np.float64).ravel()
    if m.shape != b.shape:
        raise ValueError(f"paired errors must have the same rows, got {m.shape} and {b.shape}")
    if m.size == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "verdict": "not distinguishable"}
    both = _resampled(np.stack([m, b]), statistic, resamples, seed)
    lo, hi = _interval(both[0] - both[1], level)
    return {"diff": error_statistic(m, statistic) - error_statistic(b, statistic), "lo": lo, "hi": hi,
            "verdict": verdict(lo, hi)}
