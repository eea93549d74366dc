"""The rule-based cold-start teacher: traces that parse, state the example's own facts, and rate by the bias rule."""
import json

import numpy as np
import pytest

from experiments.rule_teacher import rule_rating, rule_trace, shrunk
from experiments.teacher import check_trace, example_id
from prompts import parse_completion
from test_teacher import make_example


def test_rule_rating_is_the_unshrunk_bias_model_rounded_and_clipped():
    assert rule_rating(4.0, 4.5, 4.2) == 4  # 4.3
    assert rule_rating(4.8, 4.9, 4.0) == 5  # 5.7, clipped to the scale
    assert rule_rating(1.5, 2.0, 4.0) == 1  # -0.5, clipped
    assert rule_rating(None, 3.0, 4.0) == 3  # no user average: the global mean stands in for it
    assert rule_rating(None, None, 3.6) == 4


def test_shrinking_pulls_thin_averages_toward_the_global_mean():
    assert shrunk(3.0, 1, 4.5, 1.0) == 3.75  # one rating of 3 and one usual 4.5
    assert abs(shrunk(3.0, 40, 4.5, 1.0) - 3.0366) < 1e-3  # forty ratings barely move
    assert shrunk(3.0, 1, 4.5, 0.0) == 3.0 and shrunk(None, 5, 4.5, 1.0) == 4.5
    # user 2.0 over 1 rating, item 4.0 over 1 review, mean 4.5: plain rule 1.5 -> 2; shrunk 3.25 + 4.25 - 4.5 = 3
    assert rule_rating(2.0, 4.0, 4.5) == 2
    assert rule_rating(2.0, 4.0, 4.5, n_user=1, n_item=1, shrink=1.0) == 3


def test_a_shrunk_rule_trace_shows_its_arithmetic():
    ex = make_example(1, rating=4.0)  # user: 2 ratings, mean 4; item: 2 reviews, mean 4.5
    match = parse_completion(rule_trace(ex, 4.2, shrink=1.0), template="tbr").sections["match"]
    assert "With 1 usual 4.2 added: user 4.1, item 4.4. 4.1 + 4.4 - 4.2 = 4.3, about 4." in match
    assert "added" not in rule_trace(ex, 4.2)  # shrink 0 writes the plain arithmetic


def test_stepwise_arithmetic_is_exact_as_written():
    ex = make_example(1, rating=4.0)  # user mean 4, item mean 4.5
    trace = rule_trace(ex, 4.2, stepwise=True)
    match = parse_completion(trace, template="tbr").sections["match"]
    assert "User 4 - 4.2 = -0.2. Item 4.5 - 0.2 = 4.3, about 4." in match
    assert parse_completion(trace, template="tbr").rating == 4
    ex["user_avg_rating"] = 5.0
    assert "User 5 - 4.2 = 0.8. Item 4.5 + 0.8 = 5.3, about 5." in rule_trace(ex, 4.2, stepwise=True)


def test_say_cap_names_a_sum_off_the_scale_and_rates_the_sum_as_written():
    ex = make_example(1, rating=4.0)  # item mean 4.5
    ex["user_avg_rating"] = 5.0
    plain = rule_trace(ex, 4.0)  # 5 + 4.5 - 4 = 5.5
    assert "= 5.5, about 5." in plain
    capped = rule_trace(ex, 4.0, say_cap=True)
    assert "= 5.5, capped at 5." in capped and parse_completion(capped, template="tbr").rating == 5
    assert "Item 4.5 + 0.8 = 5.3, about 5." in rule_trace(ex, 4.2, stepwise=True, say_cap=True)  # on the scale
    assert "Item 4.5 + 1 = 5.5, capped at 5." in rule_trace(ex, 4.0, stepwise=True, say_cap=True)
    ex["user_avg_rating"], ex["item_avg_rating"] = 1.0, 1.0  # 1 + 1 - 4 = -2
    assert "= -2, capped at 1." in rule_trace(ex, 4.0, say_cap=True)
    # the rating is read off the one-decimal sum as written: 4 + 4.46 - 4 = 4.46 shows "4.5", so 5, not 4
    ex["user_avg_rating"], ex["item_avg_rating"] = 4.0, 4.46
    assert "= 4.5, about 4." in rule_trace(ex, 4.0)
    assert "= 4.5, about 5." in rule_trace(ex, 4.0, say_cap=True)


def test_tenths_rate_the_written_sum_kept_on_the_scale():
    ex = make_example(1, rating=4.0)  # user mean 4, item mean 4.5
    trace = rule_trace(ex, 4.2, tenths=True)
    assert "4 + 4.5 - 4.2 = 4.3.\n</match>" in trace and parse_completion(trace, template="tbr").rating == 4.3
    assert "Item 4.5 - 0.2 = 4.3.\n</match>" in rule_trace(ex, 4.2, stepwise=True, tenths=True)
    ex["user_avg_rating"] = 5.0
    capped = rule_trace(ex, 4.2, tenths=True)  # 5 + 4.5 - 4.2 = 5.3
    assert "= 5.3, capped at 5." in capped and "<rate> 5 </rate>" in capped


def test_item_first_writes_the_item_mean_first_with_the_same_sum():
    ex = make_example(1, rating=4.0)  # user mean 4, item mean 4.5
    assert "4.5 + 4 - 4.2 = 4.3, about 4." in rule_trace(ex, 4.2, item_first=True)
    assert "4 + 4.5 - 4.2 = 4.3, about 4." in rule_trace(ex, 4.2)


def test_a_rule_trace_parses_and_states_the_examples_facts():
    ex = make_example(1, rating=4.0)  # liked "Rumours" (5), "Kid A" rated 3; the item's reviews 5 and 4
    trace = rule_trace(ex, global_mean=4.2)
    parsed = parse_completion(trace, template="tbr")
    assert parsed.format_ok, (parsed.error, trace)
    assert parsed.rating == rule_rating(4.0, 4.5, 4.2) == 4
    user, item, match = (parsed.sections[name] for name in ("analyze user", "analyze item", "match"))
    assert "2 ratings, mean 4." in user
    assert 'Liked: "Rumours" (5).' in user and "Kid A" not in user  # liked is >= 4 stars; 3 stars is neither
    assert "Disliked: none." in user
    assert "Pop" in user and "CDs & Vinyl" not in user  # the liked items' category, without the generic ones
    assert '"Item-1" (World Music): 2 earlier reviews, mean 4.5.' in item
    assert "Best (5): Joyful." in item and "Worst (4): Great melodies." in item
    assert "Shared genres: none." in match and "4 + 4.5 - 4.2 = 4.3, about 4." in match
    assert check_trace(trace, ex, tolerance=0.0)[0]  # rule 4 = label 4: kept
    assert not check_trace(rule_trace(make_example(2, rating=1.0), 4.2), make_example(2, rating=1.0))[0]


def test_without_quotes_the_item_line_states_only_the_reviews_ratings():
    ex = make_example(1, rating=4.0)
    item = parse_completion(rule_trace(ex, 4.2, quotes=False), template="tbr").sections["analyze item"]
    assert item.strip() == '"Item-1" (World Music): 2 earlier reviews, mean 4.5, from 4 to 5.'
    ex["item_history"][1]["rating"] = 5.0
    assert "mean 4.5, all 5." in rule_trace(ex, 4.2, quotes=False)


def test_titles_style_states_titles_quotes_and_the_closest_entry_without_counts():
    ex = make_example(1, rating=4.0)  # "Rumours" (5, Pop), "Kid A" (3, Rock); the item: World Music, 5 and 4
    parsed = parse_completion(rule_trace(ex, 4.2, style="titles"), template="tbr")
    assert parsed.format_ok and parsed.rating == 4
    user, item, match = (parsed.sections[name].strip() for name in ("analyze user", "analyze item", "match"))
    assert user == 'Mean 4. Liked "Rumours" (5).'  # no count, and no "Disliked" when nothing was
    assert item == '"Item-1", mean 4.5. "Joyful" (5), "Great melodies" (4).'
    # no entry shares a category with the item: the higher-rated one stands closest
    assert match == '"Rumours" (5) is closest to "Item-1": 0 genres in common. 4 + 4.5 - 4.2 = 4.3, about 4.'
    ex["user_history"][1]["categories"] = ["World Music", "Rock"]
    ex["user_history"][1]["rating"] = 2.0
    trace = rule_trace(ex, 4.2, quotes=False, style="titles")
    assert '"Kid A" (2) is closest to "Item-1": 1 genres in common.' in trace
    assert 'Disliked "Kid A" (2).' in trace and '"Item-1", mean 4.5.\n' in trace  # quotes=False: no summaries
    with pytest.raises(ValueError, match="style"):
        rule_trace(ex, 4.2, style="prose")

    from experiments.rule_fidelity import fidelity
    other = trace.replace('"Kid A" (2) is closest', '"Rumours" (5) is closest').replace("Mean 4.", "Mean 3.")
    rows = [{"id": "ex1", "format_ok": True, "rating": 4.0, "completion": text} for text in (trace, other)]
    f = fidelity(rows, {"ex1": trace}, template="tbr")
    assert f["user_count"] is None and f["item_count"] is None  # this style never states them
    assert f["closest_entry"] == 0.5 and f["user_mean"] == 0.5 and f["item_mean"] == 1.0
    assert f["item_best_quote"] is None  # quotes=False
    quoted = rule_trace(ex, 4.2, style="titles")
    rows[1]["completion"] = quoted.replace('"Joyful" (5)', '"A great album" (5)')
    f = fidelity(rows[1:], {"ex1": quoted}, template="tbr")
    assert f["item_best_quote"] == 0.0 and f["closest_entry"] == 1.0


def test_quotes_count_as_grounded_only_when_the_prompt_shows_them():
    from experiments.rule_fidelity import example_strings, fidelity, grounded

    ex = make_example(1, rating=4.0)
    strings = example_strings(ex)
    assert {"rumours", "kid a", "item-1", "joyful", "great melodies"} <= strings
    assert grounded('Liked "Rumours" (5). "Great melo" (4), "A great album" (5).', strings) == (2, 3)
    assert grounded("no quotes", strings) == (0, 0)
    trace = rule_trace(ex, 4.2, style="titles")
    rows = [{"id": "ex1", "format_ok": True, "rating": 4.0, "completion": trace}]
    assert fidelity(rows, {"ex1": trace}, "tbr", {"ex1": strings})["quotes_grounded"] == 1.0
    assert fidelity(rows, {"ex1": trace}, "tbr", {"ex1": set()})["quotes_grounded"] == 0.0
    assert "quotes_grounded" not in fidelity(rows, {"ex1": trace}, "tbr")


def test_traces_differ_with_the_data():
    a, b = make_example(1), make_example(2)
    b["user_history"][1]["rating"] = 1.0  # now a dislike
    b["item_history"] = []
    b["item_avg_rating"] = None
    ta, tb = rule_trace(a, 4.2), rule_trace(b, 4.2)
    assert ta != tb and 'Disliked: "Kid A" (1)' in tb and "no earlier reviews" in tb
    assert parse_completion(tb, template="tbr").format_ok


def test_coldstart_rules_teacher_writes_kept_and_rejected_traces(tmp_path, data_dir, default_tokenizer):
    from experiments.coldstart import ReconeConfig, sft_pairs, write_traces
    from experiments.config import load_config
    from experiments.task import RecTask
    from recdata.prepare import main as prepare

    data = tmp_path / "music"
    assert prepare(["--dataset", "amazon-music", "--raw-dir", str(data_dir / "amazon-music-2014-sample"),
                    "--out", str(data), "--max-train", "40", "--max-val", "2", "--max-test", "2", "--quiet"]) == 0
    out = tmp_path / "traces.jsonl"
    cfg = load_config(ReconeConfig, "experiments/configs/recone.yaml",
                      [f"task.data_dir={data}", "coldstart.teacher=rules", f"coldstart.out={out}",
                       "coldstart.n_examples=40", "coldstart.tolerance=0"])
    path, stats = write_traces(cfg)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 40 == stats["requested"] and stats["kept"] == sum(r["kept"] for r in records)
    assert 0 < stats["kept"] < 40  # the rule is right for some examples, not all
    assert all(r["source"] == "rules" and not r["completion"].startswith("<analyze user>") for r in records)
    pairs = sft_pairs(path, RecTask(cfg.task, default_tokenizer))
    assert len(pairs) == stats["kept"] and all(p.endswith("</rate>") for _, p in pairs)
    # coldstart.spread: n examples drawn from the whole split (seeded), not its first n
    first = [r["example_id"] for r in records]
    cfg.coldstart.n_examples = 10
    cfg.coldstart.spread = True
    spread = [[json.loads(line)["example_id"] for line in write_traces(cfg)[0].read_text().splitlines()]
              for _ in range(2)]
    assert spread[0] == spread[1] and len(spread[0]) == 10 and spread[0] != first[:10]
    # coldstart.quotes=false: the same examples, the item's line without review words
    assert any("Best (" in r["completion"] for r in records)
    cfg.coldstart.quotes = False
    plain = [json.loads(line)["completion"] for line in write_traces(cfg)[0].read_text().splitlines()]
    assert len(plain) == 10 and not any("Best (" in c for c in plain)
    # coldstart.from_prompt: every title and quote the trace states is in the (trimmed) prompt
    from experiments.rule_fidelity import QUOTED
    cfg.coldstart.style, cfg.coldstart.quotes, cfg.task.max_prompt_tokens = "titles", True, 700
    task = RecTask(cfg.task, default_tokenizer)
    prompts = {example_id(ex): " ".join(task.prompt(ex).split()) for ex in task.examples("train")}
    missing = {}
    for from_prompt in (False, True):
        cfg.coldstart.from_prompt = from_prompt
        records = [json.loads(line) for line in write_traces(cfg)[0].read_text().splitlines()]
        missing[from_prompt] = [q for r in records for q in QUOTED.findall(r["completion"])
                                if " ".join(q.split()) not in prompts[r["example_id"]]]
    assert missing[False] and not missing[True]  # the budget drops entries the whole example still has


def test_rule_fidelity_counts_where_an_answer_departs_from_its_trace():
    from experiments.rule_fidelity import arithmetic, fidelity

    assert arithmetic("... 4 + 4.5 - 4.2 = 4.3, about 4.") == (True, 4.3, 4)
    assert arithmetic("... 4 + 4.5 - 4.2 = 5.3, about 5.") == (False, 5.3, 5)
    assert arithmetic("User 4 - 4.2 = -0.2. Item 4.5 - 0.2 = 4.3, about 4.") == (True, 4.3, 4)
    assert arithmetic("User 4 - 4.2 = 0.2. Item 4.5 + 0.2 = 4.7, about 5.")[0] is False  # wrong sign
    assert arithmetic("... 4.5 + 5 - 4.2 = 5.3, capped at 5.") == (True, 5.3, 5)  # coldstart.say_cap
    assert arithmetic("... 4.5 + 4 - 4.2 = 4.3.\n</match>") == (True, 4.3, 4.3)  # coldstart.tenths
    assert arithmetic("no arithmetic here") is None

    ex = make_example(1, rating=4.0)
    trace = rule_trace(ex, 4.2, quotes=False)  # 2 ratings, mean 4; 2 reviews, mean 4.5; 4 + 4.5 - 4.2 = 4.3 -> 4
    wrong = (trace.replace("2 earlier reviews, mean 4.5", "3 earlier reviews, mean 4.5")
             .replace("4 + 4.5 - 4.2 = 4.3, about 4.", "4 + 4.5 - 4.2 = 5.3, about 5.")
             .replace("<rate> 4 </rate>", "<rate> 5 </rate>"))
    rows = [{"id": "ex1", "format_ok": True, "rating": 4.0, "completion": trace},
            {"id": "ex1", "format_ok": True, "rating": 5.0, "completion": wrong},
            {"id": "ex1", "format_ok": False, "rating": None, "completion": "junk"}]
    f = fidelity(rows, {"ex1": trace}, template="tbr")
    assert f["n_rows"] == 3 and f["n_parsed"] == 2
    assert f["rule_rating"] == 0.5 and f["user_count"] == 1.0 and f["user_mean"] == 1.0
    assert f["item_count"] == 0.5 and f["item_mean"] == 1.0
    assert f["arithmetic_written"] == 1.0 and f["arithmetic_exact"] == 0.5
    assert f["rates_own_arithmetic"] == 1.0  # the wrong answer still rates what it computed (5.3 -> 5)
    # coldstart.tenths: the sum is the rating; a whole star after it is not what the arithmetic gives
    tenths = rule_trace(ex, 4.2, quotes=False, tenths=True)
    assert "4 + 4.5 - 4.2 = 4.3.\n" in tenths and tenths.endswith("<rate> 4.3 </rate>")
    rows = [{"id": "ex1", "format_ok": True, "rating": 4.3, "completion": tenths},
            {"id": "ex1", "format_ok": True, "rating": 4.0, "completion": tenths.replace("4.3 </rate>", "4 </rate>")}]
    assert fidelity(rows, {"ex1": tenths}, template="tbr", tenths=True)["rates_own_arithmetic"] == 0.5


def test_a_half_star_rounds_up_as_a_reader_rounds():
    ex = make_example(1, rating=4.0)
    ex["user_avg_rating"] = 4.5  # 4.5 - 4 = 0.5; item 4.5 + 0.5 = 5 ... and with item 4: 4 + 0.5 = 4.5 -> 5
    ex["item_avg_rating"] = 4.0
    trace = rule_trace(ex, 4.0, stepwise=True)
    assert "Item 4 + 0.5 = 4.5, about 5." in trace and trace.endswith("<rate> 5 </rate>")
    assert rule_rating(4.5, 4.0, 4.0) == 5 and rule_rating(3.5, 4.0, 4.0) == 4  # never half-to-even


def test_the_rule_is_scored_on_a_split(tmp_path, capsys):
    from experiments.evaluate import baseline_errors
    from experiments.rule_teacher import main

    rows = [make_example(k, rating=r) for k, r in enumerate([5.0, 4.0, 1.0], start=1)]
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["--data", str(tmp_path), "--split", "val", "--shrink", "0", "1"]) == 0
    out = capsys.readouterr().out
    # training mean 10/3; every row: user 4, item 4.5 -> 4 + 4.5 - 3.33 = 5.17 -> 5 (errors 0, 1, 4)
    assert "3 rows, training mean 3.3333" in out
    assert "shrink 0: MAE 1.6667" in out and "rated 1/2/3/4/5: 0/0/0/0/3" in out
    # shrink 1 (2 ratings each): user 3.78, item 4.11 -> 4.56 -> 5 again
    assert out.count("MAE 1.6667") == 2
    # three users with the same history and three items with the same reviews: the traces differ only in the
    # item's title, so each is a copy, even against answers about another user and another item
    assert "copy 1.000 copy_u 1.000" in out
    assert main(["--data", str(tmp_path), "--style", "titles"]) == 0
    assert "shrink 0: MAE 1.6667" in capsys.readouterr().out  # the style changes the words, not the rating
    assert main(["--data", str(tmp_path), "--split", "test", "--paired"]) == 0
    paired = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  vs ")]
    base = {name: np.abs(err).mean() for name, err in baseline_errors(str(tmp_path), rows).items()}
    best = min(base, key=base.get)  # the rule's MAE is 5/3 (errors 0, 1, 4)
    assert paired[0].startswith(f"  vs {best} (best MAE baseline): MAE {5 / 3 - base[best]:+.4f} [")
    assert "(best RMSE baseline): RMSE " in paired[1] and len(paired) == 2


def test_the_rule_cli_writes_from_the_prompt(tmp_path, capsys, default_tokenizer, monkeypatch):
    import experiments.rule_teacher as rt
    from experiments.rule_teacher import main

    seen = []  # the user-history length of every example a trace is written from
    monkeypatch.setattr(rt, "rule_trace",
                        lambda ex, *a, **k: seen.append(len(ex["user_history"])) or rule_trace(ex, *a, **k))

    row = make_example(1, rating=5.0)
    row["user_history"] = [dict(row["user_history"][0], title=f"Album {k}", text="words " * 200) for k in range(8)]
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    args = ["--data", str(tmp_path), "--style", "titles", "--shrink", "0"]
    assert main(args) == 0 and main([*args, "--prompt-config", "experiments/configs/recone_long.yaml"]) == 0
    whole, shown = capsys.readouterr().out.strip().splitlines()[1::2]
    assert whole.split("rated")[0] == shown.split("rated")[0]  # the same rating from the same two means
    assert seen[0] == 8 and 1 <= seen[1] < 8  # the 1,024-token prompt drops the oldest long entries
