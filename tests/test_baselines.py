"""Tests for experiments.baselines on small synthetic data folders with a known structure."""
import json
import math
import os

import numpy as np
import pytest

from experiments import baselines as B

SMALL_GRIDS = {"prior_count": (0.0, 2.0), "bias_lambda": (1.0, 5.0), "mf_factors": (2, 4),
               "mf_lambda": (1.0, 5.0), "mf_max_sweeps": 10}


# --------------------------------------------------------------------------------------------------
# synthetic data folders
# --------------------------------------------------------------------------------------------------
def make_events(n_users, n_items, per_user, rating_fn, seed=0):
    """Each user rates ``per_user`` distinct items at increasing distinct timestamps."""
    rng = np.random.default_rng(seed)
    events = []
    t = 1_000_000
    for u in range(n_users):
        for it in rng.choice(n_items, size=per_user, replace=False):
            t += int(rng.integers(1, 100))
            events.append((f"u{u}", f"i{it}", float(rating_fn(u, int(it), rng)), t))
    rng.shuffle(events)   # timestamps interleave users
    return sorted(events, key=lambda e: e[3])


def write_dir(path, events, scale=(1, 5), max_hist=20):
    """Per-user leave-last-out split (last -> test, second last -> val), histories strictly earlier."""
    by_user, by_item = {}, {}
    for e in events:
        by_user.setdefault(e[0], []).append(e)
        by_item.setdefault(e[1], []).append(e)
    splits = {"train": [], "val": [], "test": []}
    for u, evs in by_user.items():
        for k, (uu, it, r, ts) in enumerate(evs):
            split = "test" if k == len(evs) - 1 else "val" if k == len(evs) - 2 else "train"
            uh = [{"item_id": e[1], "rating": e[2], "timestamp": e[3]} for e in evs[:k]][-max_hist:]
            ih = [{"user_id": e[0], "rating": e[2], "timestamp": e[3]}
                  for e in by_item[it] if e[3] < ts and e[0] != u][-max_hist:]
            splits[split].append({
                "user_id": u, "item_id": it, "rating": r, "timestamp": ts,
                "user_history": uh, "item_history": ih,
                "user_avg_rating": float(np.mean([h["rating"] for h in uh])) if uh else None,
                "item_avg_rating": float(np.mean([h["rating"] for h in ih])) if ih else None,
                "rating_scale": list(scale),
            })
    os.makedirs(path, exist_ok=True)
    for name, rows in splits.items():
        with open(os.path.join(path, f"{name}.jsonl"), "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    return splits


def write_rows(path, name, rows):
    with open(os.path.join(path, f"{name}.jsonl"), "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def user_bias_events(seed=0):
    offsets = np.random.default_rng(seed + 1).choice([-1.5, 0.0, 1.5], size=60)
    fn = lambda u, i, rng: np.clip(3.0 + offsets[u] + rng.normal(0, 0.3), 1, 5)  # noqa: E731
    return make_events(60, 40, 12, fn, seed), offsets


def low_rank_events(seed=0):
    rng0 = np.random.default_rng(seed + 7)
    P = rng0.normal(0, 1, (120, 2))
    Q = rng0.normal(0, 1, (50, 2))
    fn = lambda u, i, rng: np.clip(3.0 + 0.8 * P[u] @ Q[i] + rng.normal(0, 0.1), 1, 5)  # noqa: E731
    return make_events(120, 50, 25, fn, seed)


def skewed_events(seed=0):
    fn = lambda u, i, rng: float(rng.choice([1, 2, 3, 4, 5], p=[0.04, 0.04, 0.07, 0.15, 0.70]))  # noqa: E731
    return make_events(60, 30, 10, fn, seed)


@pytest.fixture(scope="module")
def low_rank_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lowrank")
    write_dir(d, low_rank_events())
    return d


@pytest.fixture(scope="module")
def low_rank_results(low_rank_dir):
    return B.run_baselines(low_rank_dir, grids=SMALL_GRIDS, write=False)


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------
def test_evaluate_predictions_hand_computed():
    m = B.evaluate_predictions([1, 2, 3, 4], [2, 2, 5, 4])       # errors 1, 0, 2, 0
    assert m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 4))
    assert set(m) == {"mae", "rmse"}
    m = B.evaluate_predictions([5.0], [3.5])
    assert m == {"mae": pytest.approx(1.5), "rmse": pytest.approx(1.5)}


def test_evaluate_predictions_rejects_bad_input():
    with pytest.raises(ValueError):
        B.evaluate_predictions([1, 2], [1])
    with pytest.raises(ValueError):
        B.evaluate_predictions([], [])


# --------------------------------------------------------------------------------------------------
# training interactions
# --------------------------------------------------------------------------------------------------
def test_collect_interactions_dedup_and_exclusion():
    ex1 = {"user_id": "a", "item_id": "x", "rating": 4, "timestamp": 10,
           "user_history": [{"item_id": "y", "rating": 2, "timestamp": 5}],
           "item_history": [{"user_id": "b", "rating": 5, "timestamp": 7},
                            {"user_id": "c", "rating": 3, "timestamp": 8}]}
    ex2 = {"user_id": "a", "item_id": "z", "rating": 1, "timestamp": 20,
           "user_history": [{"item_id": "y", "rating": 2, "timestamp": 5},        # duplicate of ex1's
                            {"item_id": "x", "rating": 4, "timestamp": 10}],      # = ex1's target
           "item_history": [{"user_id": "b", "rating": 3},                         # no timestamp
                            {"user_id": "b", "rating": 3}]}                        # untimed duplicate
    got = sorted(B.collect_interactions([ex1, ex2]))
    assert got == sorted([("a", "x", 4.0), ("a", "y", 2.0), ("b", "x", 5.0), ("c", "x", 3.0),
                          ("a", "z", 1.0), ("b", "z", 3.0)])
    # held-out pairs are dropped from histories, targets are kept
    got = sorted(B.collect_interactions([ex1, ex2], exclude_pairs={("c", "x"), ("a", "x")}))
    assert ("c", "x", 3.0) not in got and ("a", "x", 4.0) in got
    assert len(B.collect_interactions([ex1, ex2], use_histories=False)) == 2


def test_duplicate_same_rating_and_same_time_counted_once():
    ex = {"user_id": "a", "item_id": "x", "rating": 5, "timestamp": 3}
    triples = B.collect_interactions([ex, dict(ex)])
    assert triples == [("a", "x", 5.0)]
    by_b = {"user_id": "b", "item_id": "x", "rating": 2, "timestamp": 9,
            "item_history": [{"user_id": "a", "rating": 5, "timestamp": 3.0}]}      # = ex, float time
    by_a = {"user_id": "a", "item_id": "y", "rating": 4, "timestamp": 11,
            "user_history": [{"item_id": "x", "rating": 5, "timestamp": "3"}]}      # = ex, time as text
    triples = B.collect_interactions([ex, by_b, by_a])
    assert sorted(triples) == [("a", "x", 5.0), ("a", "y", 4.0), ("b", "x", 2.0)]


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
def test_mean_model_shrinkage_hand_computed():
    data = B.Interactions.from_triples([("a", "x", 5.0), ("a", "y", 3.0), ("b", "x", 1.0)])
    mu = 3.0
    m = B.MeanModel("user", prior_count=2.0).fit(data)
    a, b = data.user_index["a"], data.user_index["b"]
    assert m.predict(np.array([a, b, -1]), np.array([0, 0, 0])) == pytest.approx(
        [(8 + 2 * mu) / 4, (1 + 2 * mu) / 3, mu])
    m = B.MeanModel("item", prior_count=0.0).fit(data)
    x = data.item_index["x"]
    assert m.predict(np.array([0, 0]), np.array([x, -1])) == pytest.approx([3.0, mu])


def test_user_mean_recovers_strong_user_biases():
    events, offsets = user_bias_events()
    data = B.Interactions.from_triples([(u, i, r) for u, i, r, _ in events])
    m = B.MeanModel("user", prior_count=0.0).fit(data)
    idx = np.array([data.user_index[f"u{u}"] for u in range(60)])
    est = m.predict(idx, np.zeros_like(idx))
    truth = 3.0 + offsets
    assert np.max(np.abs(est - truth)) < 0.3
    assert np.corrcoef(est, truth)[0, 1] > 0.98


def test_bias_als_matches_closed_form_ridge():
    rng = np.random.default_rng(3)
    triples = [(f"u{rng.integers(8)}", f"i{rng.integers(6)}", float(rng.integers(1, 6))) for _ in range(60)]
    data = B.Interactions.from_triples(triples)
    lam = 2.0
    model = B.ALSModel(factors=0, lam=lam, sweeps=300).fit(data)
    nU, nI = data.n_users, data.n_items
    X = np.zeros((len(data), nU + nI))
    X[np.arange(len(data)), data.users] = 1
    X[np.arange(len(data)), nU + data.items] = 1
    w = np.linalg.solve(X.T @ X + lam * np.eye(nU + nI), X.T @ (data.ratings - data.ratings.mean()))
    assert model.bu == pytest.approx(w[:nU], abs=1e-6)
    assert model.bi == pytest.approx(w[nU:], abs=1e-6)
    # unseen user / item fall back to the bias that is known, then to mu
    p = model.predict(np.array([-1, 0, -1]), np.array([-1, -1, 0]))
    assert p == pytest.approx([model.mu, model.mu + model.bu[0], model.mu + model.bi[0]])


def test_mf_fits_low_rank_training_data_and_is_deterministic():
    events = low_rank_events()
    data = B.Interactions.from_triples([(u, i, r) for u, i, r, _ in events])
    m1 = B.ALSModel(factors=2, lam=1.0, sweeps=15, seed=5).fit(data)
    m2 = B.ALSModel(factors=2, lam=1.0, sweeps=15, seed=5).fit(data)
    assert np.array_equal(m1.P, m2.P) and np.array_equal(m1.Q, m2.Q)
    train_rmse = B.evaluate_predictions(data.ratings, m1.predict(data.users, data.items))["rmse"]
    assert train_rmse < 0.3 * data.ratings.std()


# --------------------------------------------------------------------------------------------------
# the full protocol
# --------------------------------------------------------------------------------------------------
def test_mf_beats_global_mean_on_low_rank_data(low_rank_results):
    r = low_rank_results
    assert set(r) == set(B.BASELINE_NAMES)
    assert r["mf"]["rmse"] < 0.75 * r["global_mean"]["rmse"]
    assert r["mf"]["rmse"] < r["user_item_bias"]["rmse"]
    assert r["mf"]["params"]["factors"] in SMALL_GRIDS["mf_factors"]
    assert 1 <= r["mf"]["params"]["sweeps"] <= SMALL_GRIDS["mf_max_sweeps"]
    assert r["mf"]["selection"] == "val_rmse"
    assert r["mf"]["val_rmse"] < r["global_mean"]["val_rmse"]
    assert r["mf"]["test_user_seen_share"] == 1.0


def test_global_median_beats_global_mean_on_mae_for_skewed_data(tmp_path):
    write_dir(tmp_path, skewed_events())
    r = B.run_baselines(tmp_path, grids=SMALL_GRIDS, write=False)
    assert r["global_median"]["params"]["value"] == 5.0
    assert r["global_median"]["mae"] < r["global_mean"]["mae"]
    assert r["global_mean"]["rmse"] < r["global_median"]["rmse"]


def test_user_mean_beats_global_mean_on_user_bias_data(tmp_path):
    events, _ = user_bias_events()
    write_dir(tmp_path, events)
    r = B.run_baselines(tmp_path, grids=SMALL_GRIDS, write=False)
    assert r["user_mean"]["rmse"] < 0.5 * r["global_mean"]["rmse"]
    assert r["user_item_bias"]["rmse"] < 0.5 * r["global_mean"]["rmse"]
    assert r["item_mean"]["rmse"] > r["user_mean"]["rmse"]      # items carry no signal here


def _fitted_state(data_dir, refit=True):
    s = B.load_splits(data_dir)
    fitted, data, scale = B.fit_baselines(s["train"], s["val"], B.target_pairs(s["test"]),
                                          refit_on_val=refit, grids=SMALL_GRIDS)
    state = {"n": len(data), "scale": scale}
    for name, fb in fitted.items():
        m = fb.model
        state[name] = (fb.params, fb.val_metrics,
                       [np.copy(getattr(m, a)) for a in ("value", "means", "mu", "bu", "bi", "P", "Q") if hasattr(m, a)],
                       B.predict_examples(m, data, s["test"], scale))
    return state


def _assert_same_state(a, b):
    assert a["n"] == b["n"] and a["scale"] == b["scale"]
    for name in B.BASELINE_NAMES:
        pa, va, arrs_a, preds_a = a[name]
        pb, vb, arrs_b, preds_b = b[name]
        assert pa == pb and va == vb, name
        assert all(np.array_equal(x, y) for x, y in zip(arrs_a, arrs_b)), name
        assert np.array_equal(preds_a, preds_b), name


@pytest.mark.parametrize("refit", [True, False])
def test_test_labels_are_never_used(low_rank_dir, tmp_path, refit):
    base = _fitted_state(low_rank_dir, refit)
    splits = {s: B.load_split(low_rank_dir / f"{s}.jsonl") for s in B.SPLITS}
    rng = np.random.default_rng(0)
    # 1) corrupt the test labels and the test rows' histories
    for row in splits["test"]:
        row["rating"] = float(rng.choice([1.0, 5.0]))
        for h in row["user_history"] + row["item_history"]:
            h["rating"] = 1.0
    # 2) corrupt the copies of test labels that leak into train / val item histories
    test_pairs = B.target_pairs(splits["test"])
    n_leaked = 0
    for s in ("train", "val"):
        for row in splits[s]:
            for h in row["item_history"]:
                if (h["user_id"], row["item_id"]) in test_pairs:
                    h["rating"] = 1.0 if h["rating"] > 3 else 5.0
                    n_leaked += 1
    assert n_leaked > 0, "the synthetic split should leak test labels into item histories"
    for s, rows in splits.items():
        write_rows(tmp_path, s, rows)
    _assert_same_state(base, _fitted_state(tmp_path, refit))
    # while the test metrics do see the corrupted labels
    r0 = B.run_baselines(low_rank_dir, grids=SMALL_GRIDS, write=False, refit_on_val=refit)
    r1 = B.run_baselines(tmp_path, grids=SMALL_GRIDS, write=False, refit_on_val=refit)
    assert r0["mf"]["params"] == r1["mf"]["params"] and r0["mf"]["val_rmse"] == r1["mf"]["val_rmse"]
    assert r0["mf"]["rmse"] != r1["mf"]["rmse"]


def test_val_labels_only_select_without_refit(low_rank_dir, tmp_path):
    """Without refit, changing val labels may change the choice but never the train-only data."""
    splits = {s: B.load_split(low_rank_dir / f"{s}.jsonl") for s in B.SPLITS}
    fitted, data, _ = B.fit_baselines(splits["train"], splits["val"], B.target_pairs(splits["test"]),
                                      refit_on_val=False, grids=SMALL_GRIDS)
    train_only = B.collect_interactions(splits["train"], B.target_pairs(splits["test"]) | B.target_pairs(splits["val"]))
    assert len(data) == len(train_only)
    assert fitted["global_mean"].params["value"] == pytest.approx(np.mean([r for _, _, r in train_only]))


def test_cold_start_shares_and_fallback(tmp_path):
    train = [{"user_id": "a", "item_id": "x", "rating": 5, "timestamp": 1},
             {"user_id": "b", "item_id": "y", "rating": 3, "timestamp": 2}]
    val = [{"user_id": "a", "item_id": "y", "rating": 4, "timestamp": 3}]
    test = [{"user_id": "a", "item_id": "x", "rating": 5, "timestamp": 4},     # both seen, pair seen
            {"user_id": "c", "item_id": "y", "rating": 2, "timestamp": 5},     # new user
            {"user_id": "c", "item_id": "z", "rating": 1, "timestamp": 6},     # both new
            {"user_id": "b", "item_id": "x", "rating": 4, "timestamp": 7}]     # both seen, pair new
    for name, rows in (("train", train), ("val", val), ("test", test)):
        write_rows(tmp_path, name, rows)
    r = B.run_baselines(tmp_path, grids=SMALL_GRIDS, refit_on_val=False, write=False)
    for name in B.BASELINE_NAMES:
        assert r[name]["test_user_seen_share"] == pytest.approx(0.5)
        assert r[name]["test_item_seen_share"] == pytest.approx(0.75)
        assert r[name]["test_pair_seen_share"] == pytest.approx(0.25)
        assert r[name]["n_train_interactions"] == 2
    # the global mean is 4 (ratings 5 and 3): hand-computed errors 1, 2, 3, 0
    assert r["global_mean"]["mae"] == pytest.approx(1.5)
    assert r["global_mean"]["rmse"] == pytest.approx(math.sqrt(14 / 4))
    assert r["global_mean"]["rating_scale"] == [3.0, 5.0]   # no rating_scale key: train min / max
    r = B.run_baselines(tmp_path, grids=SMALL_GRIDS, refit_on_val=True, write=False)
    assert r["global_mean"]["n_train_interactions"] == 3 and r["global_mean"]["refit_on_val"]


def test_predictions_are_clipped_to_rating_scale(tmp_path):
    events = make_events(20, 10, 6, lambda u, i, rng: 5.0 if u % 2 else 1.0)
    write_dir(tmp_path, events)
    s = B.load_splits(tmp_path)
    fitted, data, scale = B.fit_baselines(s["train"], s["val"], B.target_pairs(s["test"]), grids=SMALL_GRIDS)
    assert scale == (1.0, 5.0)
    for fb in fitted.values():
        p = B.predict_examples(fb.model, data, s["test"], scale)
        assert p.min() >= 1.0 and p.max() <= 5.0


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def test_cli_writes_baselines_json(tmp_path, capsys):
    events, _ = user_bias_events(seed=2)
    write_dir(tmp_path, events)
    assert B.main(["--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "baselines.json") as fh:
        res = json.load(fh)
    assert list(res) == list(B.BASELINE_NAMES)
    for name, entry in res.items():
        assert name in out
        for key in ("mae", "rmse", "val_mae", "val_rmse", "params", "test_user_seen_share",
                    "test_item_seen_share", "n_test"):
            assert key in entry, (name, key)
        assert 0 <= entry["mae"] <= entry["rmse"]
    assert res["mf"]["params"]["factors"] in B.MF_FACTORS_GRID
    assert res["user_item_bias"]["params"]["lambda"] in B.BIAS_LAMBDA_GRID
    # --out elsewhere
    other = tmp_path / "sub" / "b.json"
    assert B.main(["--data", str(tmp_path), "--out", str(other), "--no-refit"]) == 0
    assert set(json.loads(other.read_text())) == set(B.BASELINE_NAMES)


def test_cli_missing_data_says_run_prepare(tmp_path, capsys):
    assert B.main(["--data", str(tmp_path / "nope")]) == 2
    assert "python -m recdata.prepare" in capsys.readouterr().err
    write_rows(tmp_path, "train", [{"user_id": "a", "item_id": "x", "rating": 5}])
    assert B.main(["--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "val.jsonl" in err and "test.jsonl" in err and "recdata.prepare" in err
    with pytest.raises(B.DataNotFoundError, match="recdata.prepare"):
        B.run_baselines(tmp_path / "nope")
