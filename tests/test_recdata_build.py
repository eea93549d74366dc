"""Example builder: worked-out toy cases, the vectorised index against a plain loop, and a leakage check of
the prepared real samples recomputed independently from the raw files."""
import gzip
import json
import statistics
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from recdata.build import SPLITS, BuildConfig, ExampleBuilder, build_examples, cut, earlier_stats
from recdata.prepare import main
from recdata.readers import Interaction, Item, read_dataset

from conftest import data_sample as sample  # noqa: E402


def x(user, item, rating, ts, text=""):
    return Interaction(user, item, float(rating), ts, f"summary {user}{item}{ts}", text or f"text {user}{item}{ts}")


# (user, item, rating, time). A reviews x twice; 5 and 7 share a time; nothing at t may be seen at t.
TOY = [x("A", "x", 5, 100), x("B", "x", 3, 100), x("A", "y", 4, 200), x("B", "y", 2, 200),
       x("C", "x", 1, 300), x("A", "x", 2, 300), x("C", "y", 5, 400), x("A", "z", 3, 300)]
TOY_ITEMS = {"x": Item("x", "Item X", ["Cat"], "Brand", "$1.00", "d" * 500)}
OPEN = dict(min_history_total=0, val_frac=0.0, test_frac=0.0)  # keep every target with both sides non-empty


def test_cut():
    assert cut("short", 10) == "short"
    assert cut("exactly10!", 10) == "exactly10!"
    assert cut("eleven char", 10) == "eleven..."  # trailing space dropped before the dots
    assert len(cut("a" * 1000, 400)) == 400 and cut("a" * 1000, 400).endswith("...")


def test_toy_examples_worked_by_hand():
    splits, stats = build_examples(TOY, TOY_ITEMS, BuildConfig(user_history_max=2, item_history_max=2, **OPEN))
    assert stats["dropped"] == {"no_user_history": 3, "no_item_history": 3, "below_min_history_total": 0}
    a_x, c_y = splits["train"]
    assert [len(splits[s]) for s in SPLITS] == [2, 0, 0]

    # A rates x again at 300: A's x@100 and y@200 are earlier; z@300 (same time) is not.
    assert (a_x["user_id"], a_x["item_id"], a_x["timestamp"], a_x["rating"]) == ("A", "x", 300, 2.0)
    assert [(h["item_id"], h["timestamp"], h["rating"]) for h in a_x["user_history"]] == [("x", 100, 5.0),
                                                                                        ("y", 200, 4.0)]
    assert a_x["user_avg_rating"] == 4.5
    # x's earlier reviews by others: B@100 only (A's own earlier review of x is excluded, C@300 is a tie).
    assert [(h["user_id"], h["rating"]) for h in a_x["item_history"]] == [("B", 3.0)]
    assert a_x["item_avg_rating"] == 3.0
    assert a_x["item"] == {"title": "Item X", "categories": ["Cat"], "brand": "Brand", "price": "$1.00",
                           "description": "d" * 397 + "..."}
    assert a_x["user_history"][0]["description"] == "d" * 397 + "..."
    assert a_x["rating_scale"] == [1.0, 5.0] and a_x["example_id"] == "A|x|300"
    assert list(a_x) == ["example_id", "user_id", "item_id", "timestamp", "rating", "rating_scale", "user_history",
                         "user_avg_rating", "item", "item_history", "item_avg_rating"]
    assert list(a_x["user_history"][0]) == ["item_id", "title", "categories", "brand", "price", "rating",
                                            "timestamp", "summary", "text", "description"]
    assert list(a_x["item_history"][0]) == ["user_id", "rating", "timestamp", "summary", "text"]

    assert (c_y["user_id"], c_y["item_id"]) == ("C", "y")
    assert [h["item_id"] for h in c_y["user_history"]] == ["x"] and c_y["user_avg_rating"] == 1.0
    assert [h["user_id"] for h in c_y["item_history"]] == ["A", "B"] and c_y["item_avg_rating"] == 3.0
    # Items without metadata show their id as the title.
    assert c_y["item"]["title"] == "y" and c_y["user_history"][0]["title"] == "Item X"


def test_toy_caps_on_shown_history_do_not_change_averages():
    splits, _ = build_examples(TOY, TOY_ITEMS, BuildConfig(user_history_max=1, item_history_max=1, **OPEN))
    a_x, c_y = splits["train"]
    assert [h["item_id"] for h in a_x["user_history"]] == ["y"]  # the most recent one
    assert a_x["user_avg_rating"] == 4.5  # still over both earlier ratings
    assert [h["user_id"] for h in c_y["item_history"]] == ["B"]  # A and B tie at 200: the later in tie order
    assert c_y["item_avg_rating"] == 3.0


@pytest.mark.parametrize("min_total, kept", [(3, 2), (4, 0)])
def test_toy_min_history_total(min_total, kept):
    config = BuildConfig(user_history_max=2, item_history_max=2, min_history_total=min_total, val_frac=0.0,
                         test_frac=0.0)
    splits, stats = build_examples(TOY, TOY_ITEMS, config)
    assert len(splits["train"]) == kept
    assert stats["dropped"]["below_min_history_total"] == 2 - kept


def test_exact_repeats_get_distinct_stable_ids():
    rows = [x("A", "p", 4, 10), x("B", "p", 5, 10), x("A", "q", 3, 20), x("A", "q", 3, 20), x("C", "q", 1, 5)]
    splits, _ = build_examples(rows, {}, BuildConfig(**OPEN))
    assert [e["example_id"] for e in splits["train"]] == ["A|q|20", "A|q|20|1"]
    for e in splits["train"]:  # neither copy sees the other (same time), and C@5 is another user
        assert [h["user_id"] for h in e["item_history"]] == ["C"]


def test_earlier_stats_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    group = np.sort(rng.integers(0, 20, 500))
    ts = np.concatenate([np.sort(rng.integers(0, 8, (group == g).sum())) for g in np.unique(group)])
    values = rng.integers(1, 6, 500).astype(float)
    count, total, _, _ = earlier_stats(group, ts, values)
    for p in range(500):
        earlier = [q for q in range(500) if group[q] == group[p] and ts[q] < ts[p]]
        assert count[p] == len(earlier) and total[p] == values[earlier].sum()


def random_interactions(seed: int, n: int = 400) -> list[Interaction]:
    rng = np.random.default_rng(seed)
    # Few users, items and distinct times: many ties and repeated (user, item) pairs.
    return [x(f"u{rng.integers(0, 25)}", f"i{rng.integers(0, 15)}", rng.integers(1, 6), int(rng.integers(0, 30)))
            for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1])
def test_builder_matches_brute_force(seed):
    rows = random_interactions(seed)
    config = BuildConfig(user_history_max=4, item_history_max=3, min_history_total=3)
    builder = ExampleBuilder(rows, {}, config)
    kept = 0
    for name in SPLITS:
        for idx, e in zip(builder.splits[name], builder.iter_split(name)):
            t = rows[idx]
            earlier_u = sorted((r.timestamp, r.rating) for r in rows
                               if r.user_id == t.user_id and r.timestamp < t.timestamp)
            earlier_i = sorted((r.timestamp, r.rating) for r in rows
                               if r.item_id == t.item_id and r.user_id != t.user_id and r.timestamp < t.timestamp)
            assert e["user_avg_rating"] == pytest.approx(statistics.mean(r for _, r in earlier_u))
            assert e["item_avg_rating"] == pytest.approx(statistics.mean(r for _, r in earlier_i))
            assert [h["timestamp"] for h in e["user_history"]] == [ts for ts, _ in earlier_u[-4:]]
            assert [h["timestamp"] for h in e["item_history"]] == [ts for ts, _ in earlier_i[-3:]]
            kept += 1
    # Every dropped row is dropped for the right reason.
    n_user = [sum(r.user_id == t.user_id and r.timestamp < t.timestamp for r in rows) for t in rows]
    n_item = [sum(r.item_id == t.item_id and r.user_id != t.user_id and r.timestamp < t.timestamp for r in rows)
              for t in rows]
    dropped = builder.stats()["dropped"]
    assert dropped["no_user_history"] == sum(u == 0 for u in n_user)
    assert dropped["no_item_history"] == sum(u > 0 and i == 0 for u, i in zip(n_user, n_item))
    assert kept == sum(u > 0 and i > 0 and min(u, 4) + min(i, 3) >= 3 for u, i in zip(n_user, n_item))


def test_split_boundaries_never_cut_through_a_timestamp():
    rows = random_interactions(3, n=600)
    builder = ExampleBuilder(rows, {}, BuildConfig(min_history_total=1, val_frac=0.15, test_frac=0.15))
    times = {name: builder.ts[builder.splits[name]] for name in SPLITS}
    assert times["train"].max() < times["val"].min() <= times["val"].max() < times["test"].min()
    n = sum(len(builder.splits[s]) for s in SPLITS)
    assert n == builder.eligible_count
    assert len(builder.splits["test"]) >= round(0.15 * n)  # ties moved into the later split, never out


def test_caps_sample_deterministically():
    rows = random_interactions(4, n=600)
    full = ExampleBuilder(rows, {}, BuildConfig(min_history_total=1))
    capped = ExampleBuilder(rows, {}, BuildConfig(min_history_total=1, max_train=30, max_val=5, max_test=5))
    again = ExampleBuilder(rows, {}, BuildConfig(min_history_total=1, max_train=30, max_val=5, max_test=5))
    other_val_cap = ExampleBuilder(rows, {}, BuildConfig(min_history_total=1, max_train=30, max_val=7, max_test=5))
    other_seed = ExampleBuilder(rows, {}, BuildConfig(min_history_total=1, max_train=30, max_val=5, max_test=5, seed=1))
    for name, cap in (("train", 30), ("val", 5), ("test", 5)):
        chosen = capped.splits[name]
        assert len(chosen) == cap and set(chosen) <= set(full.splits[name])
        assert np.all(np.diff(capped.ts[chosen]) >= 0)  # still in time order
        assert np.array_equal(chosen, again.splits[name])
        assert capped.sampled_out[name] == len(full.splits[name]) - cap
    assert np.array_equal(capped.splits["train"], other_val_cap.splits["train"])
    assert not np.array_equal(capped.splits["train"], other_seed.splits["train"])


def test_config_validation():
    with pytest.raises(ValueError, match="val_frac"):
        BuildConfig(val_frac=0.6, test_frac=0.5)
    with pytest.raises(ValueError, match="rating_min"):
        BuildConfig(rating_min=5, rating_max=1)
    with pytest.raises(ValueError, match="max_train"):
        BuildConfig(max_train=-1)


# ----------------------------------------------------------------------------------------------------
# Leakage check on the prepared real samples, recomputed from the raw files without recdata's readers
# ----------------------------------------------------------------------------------------------------

def raw_rows(path: Path, keys: tuple[str, str, str, str, str]) -> list[tuple[str, str, float, int]]:
    """(user, item, rating, seconds) straight from a gzipped JSON-lines review file; an exact copy of an earlier
    review (same user, item, rating, time and text) is left out, as prepare drops it."""
    user_key, item_key, rating_key, time_key, text_key = keys
    rows, seen = [], set()
    for line in gzip.open(path, "rt", encoding="utf-8"):
        r = json.loads(line)
        when = r[time_key]
        if time_key == "date":
            when = datetime.strptime(when, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
        row = (r[user_key], r[item_key], float(r[rating_key]), int(when))
        if (row, r.get(text_key)) not in seen:
            seen.add((row, r.get(text_key)))
            rows.append(row)
    return rows


AMAZON_KEYS = ("reviewerID", "asin", "overall", "unixReviewTime", "reviewText")
PREPARED = {
    "music": ("amazon-music-2014-sample", "reviews_Digital_Music_5.json.gz", AMAZON_KEYS,
              ["--dataset", "amazon-music", "--raw-dir", "{dir}"]),
    "magazines": ("amazon-magazines-2018", "Magazine_Subscriptions_5.json.gz", AMAZON_KEYS,
                  ["--format", "amazon2018", "--reviews", "{dir}/Magazine_Subscriptions_5.json.gz",
                   "--meta", "{dir}/meta_Magazine_Subscriptions.json.gz"]),
    "yelp": ("yelp-sample", "review.json.gz", ("user_id", "business_id", "stars", "date", "text"),
             ["--dataset", "yelp", "--raw-dir", "{dir}"]),
}


@pytest.fixture(scope="module", params=sorted(PREPARED))
def prepared(request, tmp_path_factory):
    folder, reviews, keys, argv = PREPARED[request.param]
    d = sample(folder)
    out = tmp_path_factory.mktemp(request.param)
    assert main([a.replace("{dir}", str(d)) for a in argv] + ["--out", str(out), "--quiet"]) == 0
    splits = {name: [json.loads(line) for line in open(out / f"{name}.jsonl", encoding="utf-8")] for name in SPLITS}
    return splits, json.loads((out / "stats.json").read_text()), raw_rows(d / reviews, keys)


def test_no_leakage_and_history_rules(prepared):
    splits, stats, rows = prepared
    by_user, by_item = defaultdict(list), defaultdict(list)
    for user, item, rating, ts in rows:
        by_user[user].append((ts, rating, item))
        by_item[item].append((ts, rating, user))
    config = BuildConfig()
    for name in SPLITS:
        for e in splits[name]:
            u, i, t = e["user_id"], e["item_id"], e["timestamp"]
            uh, ih = e["user_history"], e["item_history"]
            assert all(h["timestamp"] < t for h in uh + ih)
            assert all(h["user_id"] != u for h in ih)  # the target's own review (and u's others) never on the item side
            earlier_u = sorted(r for r in by_user[u] if r[0] < t)
            earlier_i = sorted(r for r in by_item[i] if r[0] < t and r[2] != u)
            assert e["rating"] in {r for ts, r, item in by_user[u] if ts == t and item == i}
            assert e["user_avg_rating"] == pytest.approx(statistics.mean(r for _, r, _ in earlier_u), abs=1e-12)
            assert e["item_avg_rating"] == pytest.approx(statistics.mean(r for _, r, _ in earlier_i), abs=1e-12)
            assert len(uh) == min(len(earlier_u), config.user_history_max) >= 1
            assert len(ih) == min(len(earlier_i), config.item_history_max) >= 1
            assert len(uh) + len(ih) >= config.min_history_total
            assert [h["timestamp"] for h in uh] == [ts for ts, _, _ in earlier_u[-len(uh):]]  # oldest first
            assert [h["timestamp"] for h in ih] == [ts for ts, _, _ in earlier_i[-len(ih):]]
            assert all(len(h["summary"]) <= 200 and len(h["text"]) <= 400 for h in uh + ih)
            assert all(len(h["description"]) <= 400 for h in uh) and len(e["item"]["description"]) <= 400


def test_prepared_split_by_time_and_stats(prepared):
    splits, stats, rows = prepared
    times = {name: [e["timestamp"] for e in splits[name]] for name in SPLITS}
    assert all(times[name] == sorted(times[name]) for name in SPLITS)
    assert max(times["train"]) < min(times["val"]) <= max(times["val"]) < min(times["test"])
    ids = [e["example_id"] for name in SPLITS for e in splits[name]]
    assert len(ids) == len(set(ids))
    assert stats["interactions"] == len(rows) and stats["malformed_skipped"] == 0
    assert stats["eligible_targets"] == sum(len(splits[n]) for n in SPLITS)
    assert stats["eligible_targets"] + sum(stats["dropped"].values()) == len(rows)
    for name in SPLITS:
        assert stats["splits"][name]["count"] == len(splits[name])
        assert sum(stats["splits"][name]["ratings"].values()) == len(splits[name])
        lengths = [len(e["user_history"]) for e in splits[name]]
        assert stats["splits"][name]["user_history_len"]["median"] == statistics.median(lengths)
    n = stats["eligible_targets"]
    assert abs(stats["splits"]["test"]["count"] - 0.1 * n) < 0.02 * n


def test_music_sample_matches_data_readme():
    d = sample("amazon-music-2014-sample")
    rows, items, _ = read_dataset("amazon2014", d / "reviews_Digital_Music_5.json.gz")
    stats = ExampleBuilder(rows, items, BuildConfig()).stats()
    assert 3500 < stats["eligible_targets"] < 3900  # "about 3,700 targets remain"
    assert stats["splits"]["train"]["user_history_len"]["median"] == 3  # "median shown user history ~3"
