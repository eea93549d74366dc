"""Classic rating-prediction baselines for a prepared RecZero data folder (pure numpy).

    python -m experiments.baselines --data DIR [--out FILE] [--no-refit] [--seed N]

reads ``DIR/{train,val,test}.jsonl`` (written by ``python -m recdata.prepare``), fits six baselines,
prints a table of test MAE / RMSE and writes ``DIR/baselines.json`` (or ``--out``) as
``{name: {"mae", "rmse", "val_mae", "val_rmse", "params", ...}}``.

Baselines
---------
``global_mean``     the mean training rating (the RMSE-optimal constant).
``global_median``   the median training rating (the MAE-optimal constant; on skewed data where most
                    ratings are 5 it beats far richer models on MAE).
``user_mean``       per-user mean, shrunk toward the global mean with a prior count ``k``:
                    ``(sum_u + k * mu) / (n_u + k)``; unseen users get ``mu``. ``k`` is chosen on val.
``item_mean``       the same per item.
``user_item_bias``  ``mu + b_u + b_i`` with L2 penalty ``lam * (b_u^2 + b_i^2)``, fitted by alternating
                    least squares (exact coordinate updates); ``lam`` chosen on val.
``mf``              biased matrix factorisation ``mu + b_u + b_i + p_u . q_i`` fitted by ALS (each
                    half-step is an exact batched ridge solve over ``[p_u, b_u]`` or ``[q_i, b_i]``);
                    factors, ``lam`` and the number of ALS sweeps are chosen on val (the sweep count by
                    tracking val RMSE after every sweep). Random init with a fixed seed.

All predictions are clipped to the rating scale (``rating_scale`` of the examples if present, else
the min / max of the training ratings).

Training signal
---------------
The training interactions are (user, item, rating) triples taken from the train examples: the target
rating of each example, every ``user_history`` entry (the example's user, the entry's item) and every
``item_history`` entry (the entry's user, the example's item). All of these are real ratings given
before the target. They are deduplicated by (user, item, timestamp) (entries without a timestamp by
(user, item, rating), and dropped when a timestamped copy with the same rating exists).

History entries whose (user, item) pair is a held-out target are dropped: depending on how the data
was split, another example's ``item_history`` may contain a val/test target, and using it would leak
the label. Only the *keys* (user, item) of held-out examples are read for this, never their ratings.

Protocol (no test labels are ever used for fitting or selection):

1. selection: fit every candidate on the train interactions (val and test target pairs excluded from
   the histories), score it on the val targets, keep the one with the lowest val RMSE (first in grid
   order on ties). ``val_mae`` / ``val_rmse`` in the output come from this stage.
2. final fit (``refit_on_val=True``, the default): refit the chosen configuration on the train + val
   interactions (val targets and val histories; test target pairs excluded). With ``refit_on_val=False``
   the selection-stage models are kept. Test examples (labels *and* histories) are never used to fit.
3. evaluate on the test targets: ``mae``, ``rmse``, plus the share of test rows whose user / item /
   (user, item) pair occurs in the final training interactions (1 - share = cold-start share).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from itertools import product
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "BASELINE_NAMES", "DataNotFoundError", "Interactions", "ConstantModel", "MeanModel", "ALSModel",
    "evaluate_predictions", "load_split", "load_splits", "collect_interactions", "fit_baselines",
    "predict_examples", "run_baselines", "format_table", "main",
]

BASELINE_NAMES = ("global_mean", "global_median", "user_mean", "item_mean", "user_item_bias", "mf")
SPLITS = ("train", "val", "test")
DEFAULT_OUT_NAME = "baselines.json"
PREPARE_HINT = "run `python -m recdata.prepare` first to create train.jsonl, val.jsonl and test.jsonl"

# Default hyper-parameter grids (small on purpose: the data sets here have a few thousand ratings).
PRIOR_COUNT_GRID = (0.0, 1.0, 2.0, 5.0, 10.0)
BIAS_LAMBDA_GRID = (0.1, 1.0, 3.0, 10.0, 25.0)
BIAS_SWEEPS = 25
MF_FACTORS_GRID = (2, 4, 8, 16)
MF_LAMBDA_GRID = (1.0, 3.0, 10.0, 25.0)
MF_MAX_SWEEPS = 20
MF_INIT_STD = 0.1
DEFAULT_SCALE = (1.0, 5.0)


class DataNotFoundError(FileNotFoundError):
    """The data folder or one of its split files is missing (run ``python -m recdata.prepare``)."""


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
def evaluate_predictions(y_true: Sequence[float], y_pred: Sequence[float]) -> dict:
    """Mean absolute error and root mean squared error of ``y_pred`` against ``y_true``."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("cannot evaluate an empty set of predictions")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(p))):
        raise ValueError("y_true and y_pred must be finite")
    err = p - t
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(math.sqrt(np.mean(err * err)))}


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def load_split(path: str | os.PathLike) -> list[dict]:
    """Read one JSONL split file (blank lines are skipped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataNotFoundError(f"missing data file {path}: {PREPARE_HINT}")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            for key in ("user_id", "item_id", "rating"):
                if key not in row:
                    raise ValueError(f"{path}:{lineno}: missing key {key!r}")
            rows.append(row)
    return rows


def load_splits(data_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """``{"train": [...], "val": [...], "test": [...]}`` from ``data_dir``."""
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataNotFoundError(f"data folder {data_dir!r} does not exist: {PREPARE_HINT}")
    missing = [f"{s}.jsonl" for s in SPLITS if not os.path.isfile(os.path.join(data_dir, f"{s}.jsonl"))]
    if missing:
        raise DataNotFoundError(f"data folder {data_dir!r} lacks {', '.join(missing)}: {PREPARE_HINT}")
    return {s: load_split(os.path.join(data_dir, f"{s}.jsonl")) for s in SPLITS}


def _rating(value) -> float | None:
    try:
        r = float(value)
    except (TypeError, ValueError):
        return None
    return r if math.isfinite(r) else None


def _ts_key(ts) -> str:
    """A timestamp as a dedup key: 1700000000, 1700000000.0 and "1700000000" are the same time."""
    try:
        f = float(ts)
        if math.isfinite(f) and f == int(f):
            return str(int(f))
    except (TypeError, ValueError, OverflowError):
        pass
    return str(ts)


def target_pairs(examples: Iterable[dict]) -> set[tuple[str, str]]:
    """The (user, item) keys of a split's targets (their ratings are not read)."""
    return {(str(ex["user_id"]), str(ex["item_id"])) for ex in examples}


def collect_interactions(examples: Iterable[dict], exclude_pairs: set | frozenset = frozenset(),
                         use_histories: bool = True) -> list[tuple[str, str, float]]:
    """Deduplicated (user, item, rating) training triples from examples' targets and histories.

    Targets are always kept. History entries are dropped when their (user, item) pair is in
    ``exclude_pairs`` (held-out targets), when they lack a rating, or (item histories) a user.
    Deduplication is by (user, item, timestamp); entries without a timestamp are deduplicated by
    (user, item, rating) and skipped when a timestamped copy with the same rating exists.
    """
    timed: dict[tuple, float] = {}
    untimed: list[tuple[str, str, float]] = []
    for ex in examples:
        u, i = str(ex["user_id"]), str(ex["item_id"])
        r = _rating(ex.get("rating"))
        if r is None:
            raise ValueError(f"example for user {u!r}, item {i!r} has no numeric rating")
        candidates = [(u, i, r, ex.get("timestamp"), True)]
        if use_histories:
            for h in ex.get("user_history") or ():
                if isinstance(h, dict) and h.get("item_id") is not None:
                    candidates.append((u, str(h["item_id"]), _rating(h.get("rating")), h.get("timestamp"), False))
            for h in ex.get("item_history") or ():
                if isinstance(h, dict) and h.get("user_id") is not None:
                    candidates.append((str(h["user_id"]), i, _rating(h.get("rating")), h.get("timestamp"), False))
        for cu, ci, cr, ts, is_target in candidates:
            if cr is None or (not is_target and (cu, ci) in exclude_pairs):
                continue
            if ts is None:
                untimed.append((cu, ci, cr))
            else:
                timed.setdefault((cu, ci, _ts_key(ts)), cr)
    out = [(u, i, r) for (u, i, _), r in timed.items()]
    seen = set(out)
    for trip in untimed:
        if trip not in seen:
            seen.add(trip)
            out.append(trip)
    return out


@dataclass
class Interactions:
    """Integer-indexed training ratings plus the id -> index maps."""
    users: np.ndarray      # int64 user index per rating
    items: np.ndarray      # int64 item index per rating
    ratings: np.ndarray    # float64
    user_index: dict
    item_index: dict

    @classmethod
    def from_triples(cls, triples: Sequence[tuple[str, str, float]]) -> "Interactions":
        user_index: dict = {}
        item_index: dict = {}
        us = np.fromiter((user_index.setdefault(u, len(user_index)) for u, _, _ in triples), np.int64, len(triples))
        its = np.fromiter((item_index.setdefault(i, len(item_index)) for _, i, _ in triples), np.int64, len(triples))
        rs = np.fromiter((r for _, _, r in triples), np.float64, len(triples))
        return cls(us, its, rs, user_index, item_index)

    @property
    def n_users(self) -> int:
        return len(self.user_index)

    @property
    def n_items(self) -> int:
        return len(self.item_index)

    def __len__(self) -> int:
        return int(self.ratings.size)

    def encode(self, examples: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """User / item indices of examples' targets; -1 for ids unseen in training."""
        u = np.fromiter((self.user_index.get(str(ex["user_id"]), -1) for ex in examples), np.int64, len(examples))
        i = np.fromiter((self.item_index.get(str(ex["item_id"]), -1) for ex in examples), np.int64, len(examples))
        return u, i


# --------------------------------------------------------------------------------------------------
# models: fit(data) on Interactions, predict(u, i) on index arrays (-1 = unseen), unclipped
# --------------------------------------------------------------------------------------------------
class ConstantModel:
    """Predicts one number: the mean or the median of the training ratings."""

    def __init__(self, statistic: str = "mean"):
        if statistic not in ("mean", "median"):
            raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
        self.statistic = statistic
        self.value = float("nan")

    def fit(self, data: Interactions) -> "ConstantModel":
        fn = np.mean if self.statistic == "mean" else np.median
        self.value = float(fn(data.ratings))
        return self

    def predict(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        return np.full(np.shape(u), self.value, dtype=np.float64)

    def params(self) -> dict:
        return {"statistic": self.statistic, "value": self.value}


class MeanModel:
    """Per-user (``side="user"``) or per-item mean, shrunk toward the global mean by ``prior_count``."""

    def __init__(self, side: str = "user", prior_count: float = 0.0):
        if side not in ("user", "item"):
            raise ValueError(f"side must be 'user' or 'item', got {side!r}")
        if prior_count < 0:
            raise ValueError("prior_count must be >= 0")
        self.side = side
        self.prior_count = float(prior_count)
        self.mu = float("nan")
        self.means = np.zeros(0)
        self.counts = np.zeros(0)

    def fit(self, data: Interactions) -> "MeanModel":
        idx, n = (data.users, data.n_users) if self.side == "user" else (data.items, data.n_items)
        self.mu = float(data.ratings.mean())
        sums = np.bincount(idx, weights=data.ratings, minlength=n)
        self.counts = np.bincount(idx, minlength=n).astype(np.float64)
        denom = self.counts + self.prior_count
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (sums + self.prior_count * self.mu) / denom
        self.means = np.where(denom > 0, means, self.mu)
        return self

    def predict(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        idx = np.asarray(u if self.side == "user" else i)
        out = np.full(idx.shape, self.mu, dtype=np.float64)
        known = idx >= 0
        out[known] = self.means[idx[known]]
        return out

    def params(self) -> dict:
        return {"prior_count": self.prior_count}


def _ridge_rows(owner: np.ndarray, n_owner: int, feats: np.ndarray, target: np.ndarray, lam: float) -> np.ndarray:
    """For every owner o solve ``(sum_n x_n x_n^T + lam I) w_o = sum_n t_n x_n`` over its rows n.

    ``feats`` is (N, d); owners without rows get w = 0. Batched over owners with one ``solve``.
    """
    d = feats.shape[1]
    gram = np.zeros((n_owner, d, d))
    for a in range(d):
        for b in range(a, d):
            col = np.bincount(owner, weights=feats[:, a] * feats[:, b], minlength=n_owner)
            gram[:, a, b] = col
            if a != b:
                gram[:, b, a] = col
    gram += lam * np.eye(d)
    rhs = np.stack([np.bincount(owner, weights=target * feats[:, a], minlength=n_owner) for a in range(d)], axis=1)
    return np.linalg.solve(gram, rhs[:, :, None])[:, :, 0]


class ALSModel:
    """``mu + b_u + b_i + p_u . q_i`` fitted by alternating ridge regressions.

    With ``factors=0`` this is the regularised bias baseline ``mu + b_u + b_i``. ``mu`` is the mean
    training rating (not penalised); biases and factors share the penalty ``lam``.
    """

    def __init__(self, factors: int = 8, lam: float = 5.0, sweeps: int = 20, seed: int = 0,
                 init_std: float = MF_INIT_STD):
        if factors < 0 or sweeps < 1 or lam <= 0:
            raise ValueError("need factors >= 0, sweeps >= 1 and lam > 0")
        self.factors, self.lam, self.sweeps = int(factors), float(lam), int(sweeps)
        self.seed, self.init_std = int(seed), float(init_std)
        self.mu = float("nan")
        self.bu = self.bi = np.zeros(0)
        self.P = self.Q = np.zeros((0, self.factors))

    def fit(self, data: Interactions, on_sweep: Callable[["ALSModel", int], None] | None = None) -> "ALSModel":
        """Run ``sweeps`` ALS sweeps; ``on_sweep(model, sweep_number)`` is called after each one."""
        rng = np.random.default_rng(self.seed)
        k = self.factors
        self.mu = float(data.ratings.mean())
        self.P = rng.normal(0.0, self.init_std, (data.n_users, k))
        self.Q = rng.normal(0.0, self.init_std, (data.n_items, k))
        self.bu = np.zeros(data.n_users)
        self.bi = np.zeros(data.n_items)
        u, i, resid = data.users, data.items, data.ratings - self.mu
        ones = np.ones((len(data), 1))
        for sweep in range(1, self.sweeps + 1):
            w = _ridge_rows(u, data.n_users, np.hstack([self.Q[i], ones]), resid - self.bi[i], self.lam)
            self.P, self.bu = w[:, :k], w[:, k]
            w = _ridge_rows(i, data.n_items, np.hstack([self.P[u], ones]), resid - self.bu[u], self.lam)
            self.Q, self.bi = w[:, :k], w[:, k]
            if on_sweep is not None:
                on_sweep(self, sweep)
        return self

    def predict(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        u, i = np.asarray(u), np.asarray(i)
        out = np.full(u.shape, self.mu, dtype=np.float64)
        ku, ki = u >= 0, i >= 0
        out[ku] += self.bu[u[ku]]
        out[ki] += self.bi[i[ki]]
        both = ku & ki
        if self.factors:
            out[both] += np.einsum("nk,nk->n", self.P[u[both]], self.Q[i[both]])
        return out

    def params(self) -> dict:
        if self.factors == 0:
            return {"lambda": self.lam, "sweeps": self.sweeps}
        return {"factors": self.factors, "lambda": self.lam, "sweeps": self.sweeps, "seed": self.seed,
                "init_std": self.init_std}


# --------------------------------------------------------------------------------------------------
# selection and the full protocol
# --------------------------------------------------------------------------------------------------
def rating_scale(*splits: Sequence[dict], fallback: Sequence[float] | None = None) -> tuple[float, float]:
    """The examples' ``rating_scale`` (first one found), else ``fallback``, else (1, 5)."""
    for split in splits:
        for ex in split:
            scale = ex.get("rating_scale")
            if isinstance(scale, (list, tuple)) and len(scale) == 2:
                lo, hi = float(scale[0]), float(scale[1])
                if lo < hi:
                    return lo, hi
    if fallback is not None and len(fallback) == 2 and fallback[0] < fallback[1]:
        return float(fallback[0]), float(fallback[1])
    return DEFAULT_SCALE


@dataclass
class FittedBaseline:
    name: str
    model: object
    params: dict
    selection: str          # "val_rmse", "none" (no hyper-parameters) or "default (empty val split)"
    val_metrics: dict | None


def _candidates(name: str, grids: dict, seed: int) -> list[dict]:
    if name == "global_mean":
        return [{"statistic": "mean"}]
    if name == "global_median":
        return [{"statistic": "median"}]
    if name in ("user_mean", "item_mean"):
        return [{"prior_count": k} for k in grids["prior_count"]]
    if name == "user_item_bias":
        return [{"factors": 0, "lam": lam, "sweeps": grids["bias_sweeps"]} for lam in grids["bias_lambda"]]
    if name == "mf":
        return [{"factors": f, "lam": lam, "sweeps": grids["mf_max_sweeps"], "seed": seed}
                for f, lam in product(grids["mf_factors"], grids["mf_lambda"])]
    raise KeyError(name)


def _build(name: str, cfg: dict):
    if name in ("global_mean", "global_median"):
        return ConstantModel(cfg["statistic"])
    if name in ("user_mean", "item_mean"):
        return MeanModel(name.split("_")[0], cfg["prior_count"])
    return ALSModel(**cfg)


def _default_grids(overrides: dict | None) -> dict:
    grids = {"prior_count": PRIOR_COUNT_GRID, "bias_lambda": BIAS_LAMBDA_GRID, "bias_sweeps": BIAS_SWEEPS,
             "mf_factors": MF_FACTORS_GRID, "mf_lambda": MF_LAMBDA_GRID, "mf_max_sweeps": MF_MAX_SWEEPS}
    unknown = set(overrides or {}) - set(grids)
    if unknown:
        raise ValueError(f"unknown grid keys {sorted(unknown)}; known: {sorted(grids)}")
    grids.update(overrides or {})
    return grids


def fit_baselines(train: Sequence[dict], val: Sequence[dict], heldout_pairs: set | frozenset = frozenset(),
                  *, refit_on_val: bool = True, seed: int = 0, grids: dict | None = None,
                  names: Sequence[str] = BASELINE_NAMES) -> tuple[dict, Interactions, tuple[float, float]]:
    """Select hyper-parameters on ``val`` and fit the baselines; never sees test labels.

    ``heldout_pairs``: (user, item) keys of test targets, dropped from history-derived interactions.
    Returns ``({name: FittedBaseline}, final training Interactions, rating scale)``.
    """
    grids = _default_grids(grids)
    heldout_pairs = frozenset(heldout_pairs)
    sel_data = Interactions.from_triples(collect_interactions(train, heldout_pairs | target_pairs(val)))
    if len(sel_data) == 0:
        raise ValueError("the train split has no ratings")
    lo, hi = rating_scale(train, val, fallback=(sel_data.ratings.min(), sel_data.ratings.max()))
    val_u, val_i = sel_data.encode(val)
    val_y = np.array([_rating(ex["rating"]) for ex in val], dtype=np.float64)
    if np.isnan(val_y).any():
        raise ValueError("a val example has no numeric rating")
    has_val = val_y.size > 0

    if refit_on_val and has_val:
        final_data = Interactions.from_triples(collect_interactions(list(train) + list(val), heldout_pairs))
    else:
        final_data = sel_data

    fitted = {}
    for name in names:
        cands = _candidates(name, grids, seed)
        best_cfg, best_metrics, best_model = cands[0], None, None
        if has_val:
            for cfg in cands:
                model = _build(name, cfg)
                if isinstance(model, ALSModel) and name == "mf":
                    # choose the sweep count too: score after every sweep
                    trace = []
                    model.fit(sel_data, on_sweep=lambda m, s: trace.append(
                        (s, evaluate_predictions(val_y, np.clip(m.predict(val_u, val_i), lo, hi)))))
                    scored = [(m["rmse"], s, m) for s, m in trace]
                    _, sweeps, metrics = min(scored, key=lambda t: (t[0], t[1]))
                    cfg = dict(cfg, sweeps=sweeps)
                    if sweeps != model.sweeps:
                        model = None      # the fitted model ran past the chosen sweep count
                else:
                    model.fit(sel_data)
                    metrics = evaluate_predictions(val_y, np.clip(model.predict(val_u, val_i), lo, hi))
                if best_metrics is None or metrics["rmse"] < best_metrics["rmse"]:
                    best_cfg, best_metrics, best_model = cfg, metrics, model
        if len(cands) == 1:
            selection = "none"
        else:
            selection = "val_rmse" if has_val else "default (empty val split)"
        if final_data is sel_data and best_model is not None:
            model = best_model
        else:
            model = _build(name, best_cfg).fit(final_data)
        fitted[name] = FittedBaseline(name, model, model.params(), selection, best_metrics)
    return fitted, final_data, (lo, hi)


def predict_examples(model, data: Interactions, examples: Sequence[dict], scale: tuple[float, float]) -> np.ndarray:
    """Clipped predictions of a fitted model for examples' (user, item) targets."""
    u, i = data.encode(examples)
    return np.clip(model.predict(u, i), scale[0], scale[1])


def run_baselines(data_dir: str | os.PathLike, *, refit_on_val: bool = True, seed: int = 0,
                  grids: dict | None = None, out: str | os.PathLike | None = None, write: bool = True) -> dict:
    """Fit and evaluate all baselines on ``data_dir``; write ``baselines.json`` there (or ``out``).

    Returns ``{name: {"mae", "rmse", "val_mae", "val_rmse", "params", "selection", "n_test",
    "n_train_interactions", "test_user_seen_share", "test_item_seen_share", "test_pair_seen_share",
    "rating_scale", "refit_on_val"}}``.
    """
    splits = load_splits(data_dir)
    test = splits["test"]
    if not test:
        raise ValueError(f"{os.path.join(os.fspath(data_dir), 'test.jsonl')} is empty: nothing to evaluate")
    fitted, data, scale = fit_baselines(splits["train"], splits["val"], target_pairs(test),
                                        refit_on_val=refit_on_val, seed=seed, grids=grids)
    test_y = np.array([_rating(ex["rating"]) for ex in test], dtype=np.float64)
    if np.isnan(test_y).any():
        raise ValueError("a test example has no numeric rating")
    tu, ti = data.encode(test)
    seen_pairs = set(zip(data.users.tolist(), data.items.tolist()))
    coverage = {
        "n_test": int(test_y.size),
        "n_train_interactions": len(data),
        "test_user_seen_share": float(np.mean(tu >= 0)),
        "test_item_seen_share": float(np.mean(ti >= 0)),
        "test_pair_seen_share": float(np.mean([(a, b) in seen_pairs for a, b in zip(tu.tolist(), ti.tolist())])),
        "rating_scale": [scale[0], scale[1]],
        "refit_on_val": bool(refit_on_val and len(splits["val"]) > 0),
    }
    results = {}
    for name, fb in fitted.items():
        metrics = evaluate_predictions(test_y, predict_examples(fb.model, data, test, scale))
        results[name] = {
            **metrics,
            "val_mae": fb.val_metrics["mae"] if fb.val_metrics else None,
            "val_rmse": fb.val_metrics["rmse"] if fb.val_metrics else None,
            "params": fb.params,
            "selection": fb.selection,
            **coverage,
        }
    if write:
        path = os.fspath(out) if out is not None else os.path.join(os.fspath(data_dir), DEFAULT_OUT_NAME)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
            fh.write("\n")
    return results


def _short_params(params: dict) -> str:
    shown = {k: v for k, v in params.items() if k not in ("seed", "init_std", "statistic")}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def format_table(results: dict) -> str:
    """A plain-text table: name, test MAE, test RMSE, val RMSE, chosen hyper-parameters."""
    header = f"{'baseline':<16} {'MAE':>7} {'RMSE':>7} {'valRMSE':>8}  params"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        val = f"{r['val_rmse']:.4f}" if r.get("val_rmse") is not None else "-"
        lines.append(f"{name:<16} {r['mae']:>7.4f} {r['rmse']:>7.4f} {val:>8}  {_short_params(r['params'])}")
    if results:
        r = next(iter(results.values()))
        lines.append(f"test rows: {r['n_test']}, training ratings: {r['n_train_interactions']}, seen in training: "
                     f"users {r['test_user_seen_share']:.1%}, items {r['test_item_seen_share']:.1%}, "
                     f"(user, item) pairs {r['test_pair_seen_share']:.1%}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.baselines",
                                     description="Classic rating-prediction baselines (test MAE / RMSE).")
    parser.add_argument("--data", required=True, help="folder with train.jsonl, val.jsonl, test.jsonl")
    parser.add_argument("--out", default=None, help=f"output JSON (default: DATA/{DEFAULT_OUT_NAME})")
    parser.add_argument("--no-refit", action="store_true",
                        help="evaluate the models fitted on train only (default: refit on train + val)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MF initialisation (default 0)")
    args = parser.parse_args(argv)
    try:
        results = run_baselines(args.data, refit_on_val=not args.no_refit, seed=args.seed, out=args.out)
    except DataNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(results))
    out = args.out or os.path.join(args.data, DEFAULT_OUT_NAME)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
