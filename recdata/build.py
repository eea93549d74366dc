"""Interactions -> leakage-free rating-prediction examples, split by time (docs/paper.md, "What goes into a prompt").

For a target interaction (u, i, t) an example shows:
- user_history: u's interactions with timestamp strictly < t, oldest first, the last `user_history_max`;
- user_avg_rating: the mean of *all* u's ratings before t (not only the shown ones);
- item: i's metadata; item_history: the `item_history_max` most recent earlier reviews of i by other users;
- item_avg_rating: the mean of all earlier ratings of i by other users.

"Earlier" is strictly earlier: Amazon 2014 times are whole days, so a review written the same day as the
target is never shown. Histories come from the whole file, whatever split they sit in (the authors' code
built test histories from the test file alone; the paper asks for all interactions before t), and never
contain the target itself.

How: every interaction is ranked once by (timestamp, user_id, item_id, file order), then sorted by
(user, rank), by (item, rank) and by (user, item, rank). In each of those orders a vectorised pass gives,
per interaction, where its group starts and where its run of equal timestamps starts, so "how many / what
sum of strictly earlier entries" is a difference of positions / prefix sums. The filters and the split
need only those counts; the example dicts are built lazily, only for the targets that are kept.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from recdata.readers import Interaction, Item, placeholder_item

__all__ = ["BuildConfig", "SPLITS", "ExampleBuilder", "build_examples", "cut", "earlier_stats"]

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class BuildConfig:
    """How examples are built and split. Defaults follow the paper."""

    user_history_max: int = 10
    """Most recent earlier interactions of the user shown in a prompt (paper: 10)."""
    item_history_max: int = 10
    """Most recent earlier reviews of the target item by other users shown in a prompt (paper: 10)."""
    min_history_total: int = 5
    """Drop a target whose shown user history + shown item history is shorter than this (paper: 5)."""
    summary_chars: int = 200
    """Review summaries are cut to this many characters, ending in "..." (paper: 200)."""
    description_chars: int = 400
    """Item descriptions are cut to this many characters, ending in "..." (paper: 400)."""
    review_chars: int = 400
    """Review texts are cut to this many characters, ending in "..." (paper: 400)."""
    rating_min: float = 1.0
    """Lowest valid rating; a rating below it makes its line malformed."""
    rating_max: float = 5.0
    """Highest valid rating; a rating above it makes its line malformed."""
    val_frac: float = 0.1
    """Fraction of the eligible targets, just before the test ones in time, that form the validation split."""
    test_frac: float = 0.1
    """Fraction of the eligible targets, the latest in time, that form the test split."""
    max_train: int | None = None
    """Keep at most this many training examples, sampled with `seed` (None: all)."""
    max_val: int | None = None
    """Keep at most this many validation examples, sampled with `seed` (None: all)."""
    max_test: int | None = None
    """Keep at most this many test examples, sampled with `seed` (None: all)."""
    seed: int = 0
    """Seed of the sampling that applies the max_* caps."""

    def __post_init__(self) -> None:
        for name in ("user_history_max", "item_history_max", "min_history_total", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("summary_chars", "description_chars", "review_chars"):
            if getattr(self, name) < 4:
                raise ValueError(f"{name} must be >= 4 (room for '...'), got {getattr(self, name)}")
        for name in ("max_train", "max_val", "max_test"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {getattr(self, name)}")
        if not self.rating_min < self.rating_max:
            raise ValueError(f"rating_min ({self.rating_min}) must be below rating_max ({self.rating_max})")
        if not (0 <= self.val_frac and 0 <= self.test_frac and self.val_frac + self.test_frac < 1):
            raise ValueError(f"need 0 <= val_frac, test_frac and val_frac + test_frac < 1, got "
                             f"{self.val_frac}, {self.test_frac}")

    @property
    def rating_range(self) -> tuple[float, float]:
        return (self.rating_min, self.rating_max)

    @property
    def caps(self) -> dict[str, int | None]:
        return {"train": self.max_train, "val": self.max_val, "test": self.max_test}


def cut(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else its first limit-3 characters and "..." (limit in all)."""
    if len(text) <= limit:
        return text
    return text[:limit - 3].rstrip() + "..."


def earlier_stats(group: np.ndarray, ts: np.ndarray, values: np.ndarray):
    """Per entry of a (group, time)-sorted table: the count and sum of strictly earlier entries of its group.

    group, ts, values: (N,) arrays already sorted by group, then time.
    Returns count (N,), total (N,), group_start (N,), run_start (N,): the entries strictly earlier than
    entry p in its group are exactly positions group_start[p] .. run_start[p]-1, where run_start[p] is the
    first position of p's group holding p's timestamp (so same-time entries never see each other).
    """
    n = len(group)
    assert ts.shape == (n,) and values.shape == (n,)
    pos = np.arange(n)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = group[1:] != group[:-1]
    new_run = new_group.copy()
    new_run[1:] |= ts[1:] != ts[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, pos, 0))  # (N,)
    run_start = np.maximum.accumulate(np.where(new_run, pos, 0))  # (N,)
    prefix = np.concatenate(([0.0], np.cumsum(values, dtype=np.float64)))  # (N+1,)
    return run_start - group_start, prefix[run_start] - prefix[group_start], group_start, run_start


def _factorize(ids: list[str]) -> np.ndarray:
    """ids -> int codes whose order is the ids' string order (so codes can serve as a tie-break)."""
    names = sorted(set(ids))
    code = {name: k for k, name in enumerate(names)}
    return np.fromiter((code[x] for x in ids), dtype=np.int64, count=len(ids))


def _scatter(order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Undo a sort: out[order[p]] = values[p], i.e. values listed in `order` put back at their own index."""
    out = np.empty_like(values)
    out[order] = values
    return out


def _describe(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {"min": None, "median": None, "mean": None, "max": None}
    return {"min": int(lengths.min()), "median": float(np.median(lengths)),
            "mean": round(float(lengths.mean()), 3), "max": int(lengths.max())}


def _rating_key(rating: float) -> str:
    return str(int(rating)) if float(rating).is_integer() else f"{rating:g}"


class ExampleBuilder:
    """Indexes interactions once, applies the paper's filters, splits by time and builds examples lazily.

    builder = ExampleBuilder(interactions, items, config)
    builder.splits["train"]            # (n_train,) interaction indices, in time order
    for example in builder.iter_split("train"): ...
    builder.stats()                    # counts, drops, history lengths, rating histograms
    """

    def __init__(self, interactions: list[Interaction], items: dict[str, Item], config: BuildConfig):
        self.interactions = interactions
        self.items = items
        self.config = config
        n = len(interactions)
        self.user = _factorize([x.user_id for x in interactions])  # (N,)
        self.item = _factorize([x.item_id for x in interactions])  # (N,)
        self.ts = np.fromiter((x.timestamp for x in interactions), dtype=np.int64, count=n)  # (N,)
        self.rating = np.fromiter((x.rating for x in interactions), dtype=np.float64, count=n)  # (N,)
        file_order = np.arange(n)  # (N,) also used as "positions 0..N-1" below

        # Global time order with a stable tie-break: (time, user_id, item_id, file order).
        self.time_order = np.lexsort((file_order, self.item, self.user, self.ts))  # (N,)
        rank = _scatter(self.time_order, file_order)  # (N,) each interaction's position in time order
        o = self.time_order
        same_as_prev = np.zeros(n, dtype=bool)  # (N,) in time order: an exact repeat of the previous (u, i, t)
        same_as_prev[1:] = ((self.ts[o][1:] == self.ts[o][:-1]) & (self.user[o][1:] == self.user[o][:-1])
                            & (self.item[o][1:] == self.item[o][:-1]))
        run_start = np.maximum.accumulate(np.where(~same_as_prev, file_order, 0))
        self.repeat = _scatter(o, file_order - run_start)  # (N,) 0 for the first of identical (u, i, t), then 1..

        # Per user: strictly earlier interactions of the same user.
        self.by_user = np.lexsort((rank, self.user))  # (N,)
        u_count, u_sum, self._u_start, self._u_run = earlier_stats(
            self.user[self.by_user], self.ts[self.by_user], self.rating[self.by_user])
        # Per item: strictly earlier reviews of the same item, by anyone ...
        self.by_item = np.lexsort((rank, self.item))  # (N,)
        i_count, i_sum, self._i_start, self._i_run = earlier_stats(
            self.item[self.by_item], self.ts[self.by_item], self.rating[self.by_item])
        # ... minus those by the target's own user (the same pair reviewed twice), which the item side excludes.
        by_pair = np.lexsort((rank, self.item, self.user))  # (N,)
        pair_group = self.user[by_pair] * (int(self.item.max(initial=0)) + 1) + self.item[by_pair]
        p_count, p_sum, _, _ = earlier_stats(pair_group, self.ts[by_pair], self.rating[by_pair])

        # Back from the sorted orders to interaction index.
        self.pos_in_user = _scatter(self.by_user, file_order)  # (N,)
        self.pos_in_item = _scatter(self.by_item, file_order)  # (N,)
        self.user_count = _scatter(self.by_user, u_count)  # (N,) all of u's earlier interactions
        self.user_sum = _scatter(self.by_user, u_sum)  # (N,) sum of their ratings
        self.item_count = _scatter(self.by_item, i_count) - _scatter(by_pair, p_count)  # (N,) by other users
        self.item_sum = _scatter(self.by_item, i_sum) - _scatter(by_pair, p_sum)  # (N,)

        self.shown_user = np.minimum(self.user_count, config.user_history_max)  # (N,)
        self.shown_item = np.minimum(self.item_count, config.item_history_max)  # (N,)
        self._filter_and_split()

    # ------------------------------------------------------------------------------------------------
    # Filters and the time split (counts only; no example is built here)
    # ------------------------------------------------------------------------------------------------

    def _filter_and_split(self) -> None:
        cfg = self.config
        order = self.time_order
        no_user = self.user_count[order] == 0
        no_item = (self.item_count[order] == 0) & ~no_user
        too_short = ((self.shown_user[order] + self.shown_item[order] < cfg.min_history_total)
                     & ~no_user & ~no_item)
        self.dropped = {"no_user_history": int(no_user.sum()), "no_item_history": int(no_item.sum()),
                        "below_min_history_total": int(too_short.sum())}
        eligible = order[~(no_user | no_item | too_short)]  # (E,) in time order
        self.eligible_count = len(eligible)

        # The latest targets form the test split, the ones before them validation. A boundary never cuts
        # through one timestamp: targets tied with the first one of a later split move into that split, so
        # every train time < every val time < every test time.
        ts = self.ts[eligible]
        n = len(eligible)
        n_test = int(round(n * cfg.test_frac))
        n_val = int(round(n * cfg.val_frac))
        test_start = n - n_test
        if 0 < test_start < n:
            test_start = int(np.searchsorted(ts, ts[test_start], side="left"))
        val_start = max(test_start - n_val, 0)
        if 0 < val_start < test_start:
            val_start = int(np.searchsorted(ts, ts[val_start], side="left"))
        full = {"train": eligible[:val_start], "val": eligible[val_start:test_start], "test": eligible[test_start:]}

        # Caps: a seeded uniform sample per split, kept in time order. Each split has its own stream, so
        # changing one cap does not change the sample of another split.
        self.splits: dict[str, np.ndarray] = {}
        self.sampled_out: dict[str, int] = {}
        for k, name in enumerate(SPLITS):
            chosen = full[name]
            cap = cfg.caps[name]
            if cap is not None and cap < len(chosen):
                rng = np.random.default_rng([cfg.seed, k])
                chosen = chosen[np.sort(rng.choice(len(chosen), size=cap, replace=False))]
            self.sampled_out[name] = len(full[name]) - len(chosen)
            self.splits[name] = chosen

    # ------------------------------------------------------------------------------------------------
    # Examples
    # ------------------------------------------------------------------------------------------------

    def example_id(self, idx: int) -> str:
        """Stable across runs: user|item|timestamp, plus |k for the k-th exact repeat of that triple."""
        x = self.interactions[idx]
        base = f"{x.user_id}|{x.item_id}|{x.timestamp}"
        return f"{base}|{self.repeat[idx]}" if self.repeat[idx] else base

    def _item(self, item_id: str) -> Item:
        return self.items.get(item_id) or placeholder_item(item_id)

    def _item_fields(self, item: Item) -> dict:
        return {"title": item.title, "categories": list(item.categories), "brand": item.brand,
                "price": item.price, "description": cut(item.description, self.config.description_chars)}

    def user_history_indices(self, idx: int) -> np.ndarray:
        """Indices of u's last `user_history_max` interactions strictly before the target's time, oldest first."""
        p = self.pos_in_user[idx]
        stop = self._u_run[p]
        start = max(self._u_start[p], stop - self.config.user_history_max)
        return self.by_user[start:stop]

    def item_history_indices(self, idx: int) -> list[int]:
        """Indices of the latest `item_history_max` earlier reviews of i by other users, oldest first."""
        p = self.pos_in_item[idx]
        user = self.user[idx]
        picked: list[int] = []
        j = self._i_run[p] - 1
        # Walk back from the last strictly earlier review; only u's own earlier reviews of i are skipped.
        while j >= self._i_start[p] and len(picked) < self.config.item_history_max:
            other = self.by_item[j]
            if self.user[other] != user:
                picked.append(int(other))
            j -= 1
        return picked[::-1]

    def example(self, idx: int) -> dict:
        """The example whose target is interaction `idx` (keys are relied on by prompts/ and experiments/)."""
        cfg = self.config
        x = self.interactions[idx]
        user_history = []
        for h in self.user_history_indices(idx):
            past = self.interactions[h]
            meta = self._item(past.item_id)
            user_history.append({"item_id": past.item_id, "title": meta.title, "categories": list(meta.categories),
                                 "brand": meta.brand, "price": meta.price, "rating": past.rating,
                                 "timestamp": past.timestamp, "summary": cut(past.summary, cfg.summary_chars),
                                 "text": cut(past.text, cfg.review_chars),
                                 "description": cut(meta.description, cfg.description_chars)})
        item_history = []
        for h in self.item_history_indices(idx):
            past = self.interactions[h]
            item_history.append({"user_id": past.user_id, "rating": past.rating, "timestamp": past.timestamp,
                                 "summary": cut(past.summary, cfg.summary_chars),
                                 "text": cut(past.text, cfg.review_chars)})
        user_count, item_count = int(self.user_count[idx]), int(self.item_count[idx])
        return {
            "example_id": self.example_id(idx),
            "user_id": x.user_id,
            "item_id": x.item_id,
            "timestamp": int(x.timestamp),
            "rating": float(x.rating),
            "rating_scale": [float(cfg.rating_min), float(cfg.rating_max)],
            "user_history": user_history,
            "user_avg_rating": float(self.user_sum[idx] / user_count) if user_count else math.nan,
            "item": self._item_fields(self._item(x.item_id)),
            "item_history": item_history,
            "item_avg_rating": float(self.item_sum[idx] / item_count) if item_count else math.nan,
        }

    def iter_split(self, name: str) -> Iterator[dict]:
        """The examples of one split, in time order, built one at a time."""
        for idx in self.splits[name]:
            yield self.example(int(idx))

    # ------------------------------------------------------------------------------------------------
    # Stats
    # ------------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counts per split, rating histograms, shown history lengths, and what each filter dropped."""
        per_split = {}
        for name in SPLITS:
            chosen = self.splits[name]
            values, counts = np.unique(self.rating[chosen], return_counts=True)
            per_split[name] = {
                "count": int(len(chosen)),
                "ratings": {_rating_key(v): int(c) for v, c in zip(values, counts)},
                "timestamp_min": int(self.ts[chosen].min()) if len(chosen) else None,
                "timestamp_max": int(self.ts[chosen].max()) if len(chosen) else None,
                "user_history_len": _describe(self.shown_user[chosen]),
                "item_history_len": _describe(self.shown_item[chosen]),
            }
        return {
            "interactions": int(len(self.interactions)),
            "users": int(len(np.unique(self.user))),
            "items": int(len(np.unique(self.item))),
            "eligible_targets": int(self.eligible_count),
            "dropped": dict(self.dropped),
            "sampled_out": dict(self.sampled_out),
            "splits": per_split,
            "settings": asdict(self.config),
        }


def build_examples(interactions: list[Interaction], items: dict[str, Item],
                   config: BuildConfig | None = None) -> tuple[dict[str, list[dict]], dict]:
    """All splits as lists of example dicts, plus the builder's stats (convenient for small data)."""
    builder = ExampleBuilder(interactions, items, config or BuildConfig())
    return {name: list(builder.iter_split(name)) for name in SPLITS}, builder.stats()
