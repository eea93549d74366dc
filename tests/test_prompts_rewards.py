"""Rewards: totals and parts worked out by hand for each registered reward, ranges, and a fuzz over the ranges."""
import math
import random

import pytest

from prompts import REWARDS, reward_range


def tbr(rate, tail=""):
    return ("<analyze user> Likes melodic rock. </analyze user>\n<analyze item> Night Drive. [pos] melodic "
            f"[neg] short </analyze item>\n<match> It fits. </match>\n<rate> {rate} </rate>{tail}")


def example(label, scale=None):
    ex = {"user_id": "u1", "item_id": "i1", "rating": float(label)}
    if scale is not None:
        ex["rating_scale"] = scale
    return ex


GARBAGE = "The user will probably give it 4 stars."
MISSING_MATCH_CLOSER = tbr(4).replace("</match>", "")
WRONG_ORDER = ("<analyze item> b </analyze item><analyze user> a </analyze user><match> c </match>"
               "<rate> 4 </rate>")

# (case id, completion, label, {reward name: expected total}) -- every total worked out by hand:
#   paper          well-formed: 0.5 + (1 - |y - y_hat| / 4); malformed: -0.5
#   authors_code   well-formed: 1 + (1 - |y - y_hat| / 2); malformed: -1
#   exact_match    well-formed and y_hat == y: 2; else -1.5
#   format_only    +-0.5
#   answer_only    1 - |y - y_hat| / 4 if the last <rate> holds a valid number, else 0
#   partial_format well-formed: as paper; malformed: -0.5 + 0.125 * (sections right on their own, in order)
HAND = [
    ("exact", tbr(4), 4, {"paper": 1.5, "authors_code": 2.0, "exact_match": 2.0, "format_only": 0.5,
                          "answer_only": 1.0, "partial_format": 1.5}),
    ("exact_decimal_form", tbr("4.0"), 4, {"paper": 1.5, "authors_code": 2.0, "exact_match": 2.0}),
    ("half_off", tbr(3.5), 4, {"paper": 0.5 + (1 - 0.5 / 4),  # 1.375
                               "authors_code": 1 + (1 - 0.5 / 2),  # 1.75
                               "exact_match": -1.5, "format_only": 0.5, "answer_only": 0.875,
                               "partial_format": 1.375}),
    ("near_integer_is_not_exact", tbr(4.4), 4, {"exact_match": -1.5, "paper": 0.5 + (1 - 0.4 / 4)}),
    ("worst", tbr(5), 1, {"paper": 0.5, "authors_code": 1 + (1 - 4 / 2),  # 0.0
                          "exact_match": -1.5, "format_only": 0.5, "answer_only": 0.0, "partial_format": 0.5}),
    ("one_off", tbr(2), 3, {"paper": 1.25, "authors_code": 1.5, "answer_only": 0.75}),
    ("trailing_text", tbr(4, " Hope this helps!"), 5, {"paper": -0.5, "authors_code": -1.0, "exact_match": -1.5,
                                                       "format_only": -0.5, "answer_only": 0.75,
                                                       "partial_format": -0.5 + 4 * 0.125}),  # 0.0
    ("trailing_im_end", tbr(4, "<|im_end|>"), 5, {"paper": 1.25, "authors_code": 1.5, "partial_format": 1.25}),
    ("garbage", GARBAGE, 4, {"paper": -0.5, "authors_code": -1.0, "exact_match": -1.5, "format_only": -0.5,
                             "answer_only": 0.0, "partial_format": -0.5}),
    ("empty", "", 4, {"paper": -0.5, "authors_code": -1.0, "exact_match": -1.5, "answer_only": 0.0,
                      "partial_format": -0.5}),
    ("missing_closer", MISSING_MATCH_CLOSER, 4, {"paper": -0.5, "authors_code": -1.0, "answer_only": 1.0,
                                                  "partial_format": -0.5 + 3 * 0.125}),  # -0.125
    ("wrong_order", WRONG_ORDER, 4, {"paper": -0.5, "partial_format": -0.125}),
    ("rating_out_of_range", tbr(6), 5, {"paper": -0.5, "authors_code": -1.0, "answer_only": 0.0,
                                        "partial_format": -0.125}),
    ("two_rate_blocks", tbr(2) + "\n<rate> 3 </rate>", 3, {"paper": -0.5, "authors_code": -1.0,
                                                            "exact_match": -1.5, "answer_only": 1.0,
                                                            "partial_format": -0.5 + 3 * 0.125}),
]


@pytest.mark.parametrize("text, label, expected", [c[1:] for c in HAND], ids=[c[0] for c in HAND])
def test_hand_computed_totals(text, label, expected):
    for name, total in expected.items():
        got, parts = REWARDS[name](text, example(label))
        assert got == pytest.approx(total), name
        assert parts["format"] + parts["answer"] == pytest.approx(got), name


def test_parts_for_logging():
    total, parts = REWARDS["paper"](tbr(3.5), example(4))
    assert total == 1.375
    assert parts == {"format": 0.5, "answer": 0.875, "format_ok": 1.0, "abs_error": 0.5}
    total, parts = REWARDS["paper"](GARBAGE, example(4))
    assert (total, parts["format"], parts["answer"], parts["format_ok"]) == (-0.5, -0.5, 0.0, 0.0)
    assert math.isnan(parts["abs_error"])
    # The rating of a malformed output is still logged (the last <rate> block), but it earns nothing under paper.
    total, parts = REWARDS["paper"](tbr(4, " extra"), example(5))
    assert (total, parts["abs_error"], parts["format_ok"]) == (-0.5, 1.0, 0.0)
    _, parts = REWARDS["exact_match"](GARBAGE, example(4))
    assert (parts["format"], parts["answer"]) == (-1.5, 0.0)
    _, parts = REWARDS["exact_match"](tbr(3), example(4))
    assert (parts["format"], parts["answer"]) == (0.0, -1.5)


def test_rating_scale_from_example():
    # 1-10 scale: max_error 9; label 8, prediction 6 -> 0.5 + (1 - 2/9).
    total, _ = REWARDS["paper"](tbr(6), example(8, scale=[1, 10]))
    assert total == pytest.approx(0.5 + 7 / 9)
    # 6 is out of range on the default 1-5 scale.
    assert REWARDS["paper"](tbr(6), example(5))[0] == -0.5
    # authors_code keeps the code's divisor 2: label 10, prediction 1 -> 1 + (1 - 9/2) = -2.5.
    assert REWARDS["authors_code"](tbr(1), example(10, scale=[1, 10]))[0] == pytest.approx(-2.5)
    assert reward_range("authors_code", (1, 10)) == (-2.5, 2.0)


def test_template_keyword():
    assert REWARDS["paper"]("<rate> 4 </rate>", example(4), template="answer_only")[0] == 1.5
    assert REWARDS["paper"]("<rate> 4 </rate>", example(4))[0] == -0.5
    single = "<think> rock fan, rock album </think>\n<rate> 3 </rate>"
    assert REWARDS["paper"](single, example(4), template="single_think")[0] == 1.25
    # partial credit is per section of the template: 0.25 each for single_think.
    assert REWARDS["partial_format"]("<think> x </think> <rate> 9 </rate>", example(4),
                                     template="single_think")[0] == -0.25


def test_strict_outside_keyword():
    text = "Sure!\n" + tbr(4)
    assert REWARDS["paper"](text, example(4))[0] == -0.5
    assert REWARDS["paper"](text, example(4), strict_outside=False)[0] == 1.5


def test_missing_label_is_a_data_bug():
    with pytest.raises(KeyError):
        REWARDS["paper"](tbr(4), {"user_id": "u1"})


def test_registry_and_ranges():
    assert set(REWARDS) == {"paper", "authors_code", "exact_match", "format_only", "answer_only", "partial_format"}
    assert reward_range("paper") == (-0.5, 1.5)
    assert reward_range("authors_code") == (-1.0, 2.0)
    assert reward_range("exact_match") == (-1.5, 2.0)
    assert reward_range("format_only") == (-0.5, 0.5)
    assert reward_range("answer_only") == (0.0, 1.0)
    assert reward_range("partial_format") == (-0.5, 1.5)
    with pytest.raises(ValueError):
        reward_range("nope")
    for fn in REWARDS.values():
        assert "Range" in fn.__doc__


def _fuzz_completions(rng, n):
    pieces = ["<analyze user>", "</analyze user>", "<analyze item>", "</analyze item>", "<match>", "</match>",
              "<rate>", "</rate>", " x ", " 4 ", "3.5", "1", "5", "0", "nan", "<|im_end|>", "\n", "🎸"]
    for i in range(n):
        if i % 2:
            yield "".join(rng.choice(pieces) for _ in range(rng.randrange(20)))
        else:
            text = tbr(rng.choice(["1", "2.5", "4", "5", "0", "x"]))
            i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
            yield rng.choice([text, text[:i] + text[j:], text[:j] + text[i:]])
    yield from [None, b"\xff", 3]


def test_every_reward_stays_in_its_range():
    rng = random.Random(0)
    seen = {name: set() for name in REWARDS}
    for text in _fuzz_completions(rng, 1500):
        label = float(rng.randint(1, 5))
        for name, fn in REWARDS.items():
            total, parts = fn(text, example(label))
            lo, hi = reward_range(name)
            assert lo - 1e-12 <= total <= hi + 1e-12, (name, text, total)
            assert set(parts) == {"format", "answer", "format_ok", "abs_error"}
            seen[name].add(round(total, 6))
    # The fuzz reaches both ends of every range (answer_only: 0 and 1), and graded values in between.
    for name in REWARDS:
        assert set(reward_range(name)) <= seen[name], name
    for name in ("paper", "authors_code", "answer_only", "partial_format"):
        assert len(seen[name]) >= 5, name


def test_partial_format_ranks_any_well_formed_output_above_any_malformed_one():
    rng = random.Random(3)
    well, mal = [], []
    for text in _fuzz_completions(rng, 1500):
        total, parts = REWARDS["partial_format"](text, example(1))
        (well if parts["format_ok"] else mal).append(total)
    assert well and mal and min(well) >= 0.5 > 0.0 >= max(mal)
    assert len(set(mal)) >= 3  # malformed outputs get graded credit: groups are not all equal
