"""The rule-based cold-start teacher: traces that parse, state the example's own facts, and rate by the bias rule."""
import json

from experiments.rule_teacher import rule_rating, rule_trace
from experiments.teacher import check_trace
from prompts import parse_completion
from test_teacher import make_example


def test_rule_rating_is_the_unshrunk_bias_model_rounded_and_clipped():
    assert rule_rating(4.0, 4.5, 4.2) == 4  # 4.3
    assert rule_rating(4.8, 4.9, 4.0) == 5  # 5.7, clipped to the scale
    assert rule_rating(1.5, 2.0, 4.0) == 1  # -0.5, clipped
    assert rule_rating(None, 3.0, 4.0) == 3  # no user average: the global mean stands in for it
    assert rule_rating(None, None, 3.6) == 4


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
