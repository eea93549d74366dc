"""Evaluation you can trust: bootstrap intervals, paired verdicts, worst-case scoring of format failures and the
copy rate (experiments.stats, experiments.task.rating_metrics, experiments.copying, experiments.evaluate's
scoring without a model). Seconds, no model."""
import json

import numpy as np
import pytest

from experiments.copying import copy_rate, copy_shares, ngrams, reasoning_text, words
from experiments.evaluate import format_table, interval_metrics, paired_metrics, score_completions
from experiments.report import _metric_row, evaluation_rows
from experiments.stats import bootstrap_ci, error_statistic, paired_bootstrap, verdict
from experiments.task import RecTask, TaskConfig, rating_metrics, worst_ratings
from prompts import TEMPLATES


# ----------------------------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stat", ["mae", "rmse"])
def test_constant_error_gives_a_zero_width_interval_at_that_value(stat):
    value, lo, hi = bootstrap_ci(np.full(50, -0.75), stat)
    assert value == lo == hi == pytest.approx(0.75)


def test_interval_covers_the_value_and_narrows_with_more_rows():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (50, 2000):
        errors = rng.normal(0.0, 1.0, size=n)
        for stat in ("mae", "rmse"):
            value, lo, hi = bootstrap_ci(errors, stat)
            assert lo < value < hi and value == pytest.approx(error_statistic(errors, stat))
            widths[n, stat] = hi - lo
    for stat in ("mae", "rmse"):
        assert widths[2000, stat] < 0.5 * widths[50, stat]  # ~ 1/sqrt(n): 6x narrower expected
    # The true MAE of N(0, 1) is sqrt(2/pi) ~ 0.798: the large-sample interval covers it.
    _, lo, hi = bootstrap_ci(rng.normal(0.0, 1.0, size=2000), "mae")
    assert lo < np.sqrt(2 / np.pi) < hi


def test_bootstrap_is_reproducible_and_seeded():
    errors = np.random.default_rng(2).normal(size=100)
    assert bootstrap_ci(errors, "mae") == bootstrap_ci(errors, "mae")
    assert bootstrap_ci(errors, "mae", seed=1) != bootstrap_ci(errors, "mae", seed=0)
    assert all(np.isnan(bootstrap_ci([], "rmse")))
    with pytest.raises(ValueError):
        bootstrap_ci(errors, "median")


def test_paired_verdicts():
    rng = np.random.default_rng(3)
    baseline = rng.normal(0.0, 1.2, size=300)                 # errors of a baseline
    model = baseline * 0.3                                    # the same rows, a much smaller error on each
    for stat in ("mae", "rmse"):
        better = paired_bootstrap(model, baseline, stat)
        assert better["verdict"] == "better" and better["hi"] < 0 and better["lo"] <= better["diff"] <= better["hi"]
        assert better["diff"] == pytest.approx(error_statistic(model, stat) - error_statistic(baseline, stat))
        worse = paired_bootstrap(baseline, model, stat)
        assert worse["verdict"] == "worse" and worse["lo"] > 0
        same = paired_bootstrap(baseline, baseline.copy(), stat)
        assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "verdict": "not distinguishable"}
    # Two different but equally good predictors: the interval contains 0.
    other = rng.normal(0.0, 1.2, size=300)
    assert paired_bootstrap(other, baseline, "mae")["verdict"] == "not distinguishable"
    with pytest.raises(ValueError):
        paired_bootstrap(model, baseline[:-1])


def test_pairing_matters():
    """Rows of very different difficulty: unpaired intervals of the two MAEs overlap, the paired difference
    (the model is better by 0.05 on every row) is still clearly better."""
    rng = np.random.default_rng(4)
    hard = rng.exponential(1.0, size=300)
    model, baseline = hard, hard + 0.05
    _, lo_m, hi_m = bootstrap_ci(model, "mae")
    _, lo_b, hi_b = bootstrap_ci(baseline, "mae")
    assert lo_b < hi_m  # unpaired: overlapping
    assert paired_bootstrap(model, baseline, "mae")["verdict"] == "better"


def test_verdict_boundaries():
    assert verdict(-0.3, -0.01) == "better" and verdict(0.01, 0.3) == "worse"
    assert verdict(-0.1, 0.0) == verdict(0.0, 0.1) == verdict(-0.1, 0.1) == "not distinguishable"


# ----------------------------------------------------------------------------------------------------------
# A format failure never makes a model look better
# ----------------------------------------------------------------------------------------------------------
def test_worst_case_rating_is_the_farthest_on_the_scale():
    assert list(worst_ratings([4, 1, 2, 5, 3, 4.5, 2.5], (1, 5))) == [1, 5, 5, 1, 1, 1, 5]  # 3: the low end
    assert list(worst_ratings([0, 10, 6], (0, 10))) == [10, 0, 0]
    m = rating_metrics([3.0], [3.0], [True])  # the midpoint: distance 2 either way
    assert m["mae"] == 2.0 and m["rmse"] == 2.0 and m["mae_fallback"] == 0.0


def test_failures_are_scored_worst_case_and_the_fallback_stays_beside():
    labels = [4.0, 1.0, 5.0, 2.0]
    preds = [4.0, 2.0, 4.1, 2.2]  # rows 2 and 3 failed: 4.1 / 2.2 are their fallback (user average) ratings
    failed = [False, False, True, True]
    m = rating_metrics(labels, preds, failed)
    assert m["mae"] == pytest.approx((0 + 1 + 4 + 3) / 4)          # failures: label 5 -> 1, label 2 -> 5
    assert m["rmse"] == pytest.approx(np.sqrt((0 + 1 + 16 + 9) / 4))
    assert m["mae_fallback"] == pytest.approx((0 + 1 + 0.9 + 0.2) / 4)
    assert m["rmse_fallback"] == pytest.approx(np.sqrt((0 + 1 + 0.81 + 0.04) / 4))
    assert m["format_fail"] == 0.5 and m["mae_parsed_only"] == pytest.approx(0.5)
    assert [m[f"pred_hist/{r}"] for r in range(1, 6)] == [0, 1, 0, 1, 0]  # parsed answers only


def test_a_model_that_fails_every_row_is_worse_than_every_sensible_baseline():
    rng = np.random.default_rng(5)
    labels = rng.integers(1, 6, size=400).astype(float)
    user_avg = np.clip(labels + rng.normal(0, 0.5, size=400), 1, 5)  # a fallback that is close to the labels
    m = rating_metrics(labels, user_avg, np.ones(400, dtype=bool))
    baselines = {"user_avg": user_avg, "global_mean": np.full(400, labels.mean()), "median": np.full(400, 4.0),
                 "always_1": np.ones(400), "always_5": np.full(400, 5.0),
                 "random": rng.uniform(1, 5, size=400), "oracle": labels}
    for name, p in baselines.items():
        assert m["mae"] >= np.mean(np.abs(labels - p)), name
        assert m["rmse"] >= np.sqrt(np.mean((labels - p) ** 2)), name
    assert m["mae_fallback"] == pytest.approx(np.mean(np.abs(labels - user_avg)))  # what it used to score
    assert m["mae"] > 2 * m["mae_fallback"]
    assert np.isnan(m["corr"])  # nothing parsed: no correlation of the fallback passed off as the model's


# ----------------------------------------------------------------------------------------------------------
# Copy rate
# ----------------------------------------------------------------------------------------------------------
LONG = ("<analyze user>\nThe user loves loud guitar rock and rates most albums generously.\n</analyze user>\n"
        "<analyze item>\nItem: Big Riffs. [pos] loud guitars [neg] short running time\n</analyze item>\n"
        "<match>\nThe guitars fit what the user enjoys, the length is a small drawback.\n</match>\n<rate> 4 </rate>")


def numbered(k: int, n_words: int = 20) -> str:
    return " ".join(f"w{k}x{i}" for i in range(n_words))


def test_reasoning_text_drops_tags_and_the_rating():
    text = reasoning_text(LONG)
    assert "analyze" not in words(text) and "rate" not in words(text) and "4" not in words(text)
    assert words(text)[:3] == ["the", "user", "loves"] and "pos" in words(text)
    assert reasoning_text("<think> a b </think><rate> 5").split() == ["a", "b"]
    assert len(ngrams("one two three four five six")) == 1 and ngrams("one two three four five") == set()


def test_identical_long_answers_are_all_copied():
    r = copy_rate([LONG] * 5)
    assert r["copy_rate"] == 1.0 and r["copied"] == 5 and r["shares"] == [1.0] * 5
    assert r["sources"][0] == "answer 1" and r["sources"][4] == "answer 0"


def test_disjoint_answers_are_not_copied():
    r = copy_rate([numbered(k) for k in range(50)])
    assert r["copy_rate"] == 0.0 and r["shares"] == [0.0] * 50 and r["with_ngrams"] == 50
    assert copy_rate([LONG])["copy_rate"] == 0.0  # a single answer is not compared with itself


def test_copying_the_prompt_demonstration_is_copied():
    demo = TEMPLATES["tbr"].one_shot_answer
    answer = demo.replace("<rate> 4 </rate>", "<rate> 5 </rate>")
    r = copy_rate([answer, numbered(1)], demonstrations=[demo])
    assert r["copied_flags"] == [True, False] and r["sources"][0] == "demonstration 0" and r["shares"][0] == 1.0
    assert copy_rate([answer, numbered(1)])["copy_rate"] == 0.0  # without the demonstration: nothing to copy


def test_related_answers_are_not_compared_with_each_other():
    demo = TEMPLATES["tbr"].one_shot_answer
    # answers 0 and 1 are about the same item, 2 says the same about another item and user, 3 is its own
    answers = [LONG, LONG, LONG, numbered(3)]
    about = [("user:a", "item:x"), ("user:b", "item:x"), ("user:c", "item:y"), ("user:d", "item:z")]
    assert copy_rate(answers, related=about)["copied_flags"] == [True, True, True, False]  # 0, 1 copy 2
    about[2] = ("user:c", "item:x")  # now all three are about item x: none is compared with another
    assert copy_rate(answers, related=about)["copied_flags"] == [False, False, False, False]
    assert copy_rate(answers)["copied_flags"] == [True, True, True, False]  # without labels: all compared
    # the demonstration is compared whatever the labels
    answer = demo.replace("<rate> 4 </rate>", "<rate> 5 </rate>")
    assert copy_rate([answer, answer], [demo], related=[("item:x",), ("item:x",)])["copy_rate"] == 1.0


def test_answers_shorter_than_six_words_are_not_copied():
    r = copy_rate(["<analyze user> likes rock a lot </analyze user><rate> 4 </rate>"] * 10)
    assert r["copy_rate"] == 0.0 and r["with_ngrams"] == 0
    r = copy_rate(["one two three four five six"] * 2)  # exactly six words: one 6-gram, shared
    assert r["copy_rate"] == 1.0


def test_the_thirty_percent_boundary():
    # 15 words -> 10 distinct 6-grams; the other text shares the first 8 words -> 3 shared 6-grams = 0.30.
    base = [f"a{i}" for i in range(15)]
    at = " ".join(base[:8] + [f"b{i}" for i in range(20)])
    above = " ".join(base[:9] + [f"c{i}" for i in range(20)])  # 9 shared words -> 4 6-grams = 0.40
    assert copy_shares([" ".join(base), at])[0][0] == pytest.approx(0.3)
    assert copy_rate([" ".join(base), at])["copied_flags"][0] is False
    assert copy_shares([" ".join(base), above])[0][0] == pytest.approx(0.4)
    assert copy_rate([" ".join(base), above])["copied_flags"][0] is True
    # The share is the copier's: the long other text shares only 3 of its 23 6-grams.
    assert copy_shares([" ".join(base), at])[1][0] == pytest.approx(3 / 23)


def test_copy_rate_is_fast_on_a_full_test_split():
    import time

    same = [LONG + f" filler {k}" for k in range(367)]
    start = time.perf_counter()
    assert copy_rate(same)["copy_rate"] == 1.0
    assert copy_rate([numbered(k, 80) for k in range(367)])["copy_rate"] == 0.0
    assert time.perf_counter() - start < 5.0


# ----------------------------------------------------------------------------------------------------------
# evaluate's scoring and table, report's columns (no model)
# ----------------------------------------------------------------------------------------------------------
def example(rating: float, user_avg: float = 4.0) -> dict:
    return {"rating": rating, "user_avg_rating": user_avg, "item_avg_rating": 3.5, "rating_scale": [1, 5]}


def test_score_completions_gives_every_new_number():
    task = RecTask(TaskConfig(template="tbr", one_shot="turn", prefill="<analyze user>\n"), tokenizer=None)
    labels = [5.0, 4.0, 2.0, 1.0]
    items = [{"id": f"r{k}", "example": example(y)} for k, y in enumerate(labels)]
    good = LONG.split("<analyze user>\n", 1)[1]  # what the model writes after the prefill
    completions = [good, good.replace("<rate> 4", "<rate> 3"), "no format at all", "nope"]
    demo = TEMPLATES["tbr"].one_shot_answer
    metrics, rows = score_completions(task, items, completions, [demo])
    assert metrics["format_fail"] == 0.5
    assert metrics["mae"] == pytest.approx((1 + 1 + 3 + 4) / 4)         # failures: label 2 -> 5, label 1 -> 5
    assert metrics["mae_fallback"] == pytest.approx((1 + 1 + 2 + 3) / 4)  # failures as user_avg 4.0
    assert metrics["mae_lo"] <= metrics["mae"] <= metrics["mae_hi"]
    assert metrics["rmse_lo"] <= metrics["rmse"] <= metrics["rmse_hi"]
    assert metrics["copy_rate"] == 0.5 and metrics["copied"] == 2  # the two well-formed answers share their text
    assert [r["scored_as"] for r in rows] == [4.0, 3.0, 5.0, 5.0]
    assert rows[0]["copied_from"] == "answer 1" and rows[2]["copy_share"] == 0.0
    json.dumps(metrics)

    base_err = np.array([0.1, -0.1, 0.2, 0.3])
    model_err = np.array([r["scored_as"] - r["label"] for r in rows])
    metrics["vs_baselines"] = {"user_mean": paired_metrics(model_err, base_err)}
    assert metrics["vs_baselines"]["user_mean"]["mae_verdict"] == "worse"
    metrics["len_mean"] = 10.0
    table = format_table({"m": metrics}, {"user_mean": interval_metrics(base_err)})
    assert "MAE [95% CI]" in table and "copy" in table and "MAE fb" in table
    assert f"{metrics['mae']:7.4f} [{metrics['mae_lo']:6.4f}, {metrics['mae_hi']:6.4f}]" in table
    assert "    - user_mean: MAE +" in table and "worse; RMSE" in table

    row = _metric_row(metrics)
    assert row["mae_ci"] == f"[{metrics['mae_lo']:.4f}, {metrics['mae_hi']:.4f}]"
    assert row["vs_baselines_mae"].startswith("user_mean: worse (+") and row["failures_scored_as"] == "farthest"


def test_report_reads_old_and_new_evaluation_files(tmp_path):
    old = {"data": "data/amazon-music", "split": "test", "n": 4, "command": "x",
           "models": {"default": {"mae": 0.341, "rmse": 0.5, "format_fail": 1.0, "n": 4}},
           "baselines_same_rows": {"mf": {"mae": 0.6, "rmse": 0.8}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    rows = evaluation_rows(tmp_path / "old.json", tmp_path)
    model = next(r for r in rows if r["kind"] == "untrained")
    assert model["mae"] == 0.341 and model["mae_ci"] is None and model["vs_baselines_mae"] is None
    assert model["failures_scored_as"] == "fallback (older file)"
    new = json.loads(json.dumps(old))
    new["models"]["default"].update(mae=3.0, mae_lo=2.5, mae_hi=3.5, mae_fallback=0.341, copy_rate=0.0,
                                    vs_baselines={"mf": {"mae_diff": 2.4, "mae_diff_lo": 2.0, "mae_diff_hi": 2.8,
                                                         "mae_verdict": "worse"}})
    new["baselines_same_rows"]["mf"].update(mae_lo=0.5, mae_hi=0.7)
    (tmp_path / "new.json").write_text(json.dumps(new))
    rows = evaluation_rows(tmp_path / "new.json", tmp_path)
    model = next(r for r in rows if r["kind"] == "untrained")
    assert model["mae_ci"] == "[2.5000, 3.5000]"
    assert model["vs_baselines_mae"] == "mf: worse (+2.4000 [+2.0000, +2.8000])"
    assert model["vs_baselines_rmse"] is None and model["failures_scored_as"] == "farthest"
    base = next(r for r in rows if r["kind"] == "baseline (same rows)")
    assert base["mae_ci"] == "[0.5000, 0.7000]"


def test_copy_penalty_rewards_a_copied_demonstration_as_a_malformed_answer():
    from experiments.task import RecTask, TaskConfig
    from prompts.templates import get_template

    task = RecTask(TaskConfig(one_shot="turn", prefill="<analyze user>\n", copy_penalty=0.3), tokenizer=None)
    demo = get_template("tbr").one_shot_answer
    item = {"example": {"rating": 4.0, "user_avg_rating": 4.0, "item_avg_rating": 4.0}}
    copied = demo.removeprefix("<analyze user>\n")  # the completion after the prefill
    original = ("The user reviews jazz records and dislikes noisy production, rating most albums three stars.\n"
                "</analyze user>\n<analyze item>\nA live recording [pos] warm sound [neg] long tracks\n</analyze item>\n"
                "<match>\nThe warm sound suits the user although the long tracks may tire them.\n</match>\n<rate> 4 </rate>")
    off = RecTask(TaskConfig(one_shot="turn", prefill="<analyze user>\n"), tokenizer=None)
    total_copied, parts_copied = task.reward(item, copied)
    assert parts_copied["copied"] == 1.0
    assert total_copied == task.reward(item, "no tags at all")[0] < off.reward(item, copied)[0]
    total_original, parts_original = task.reward(item, original)
    assert parts_original["copied"] == 0.0 and total_original == off.reward(item, original)[0] > total_copied
    assert "copied" not in off.reward(item, original)[1]  # off: no part, no change
