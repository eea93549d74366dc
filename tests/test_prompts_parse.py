"""The completion parser: a table of messy outputs with their verdicts; a fuzz test against a regex oracle."""
import math
import random
import re

import pytest

from prompts import ParseResult, parse_completion, parse_rating, well_formed_sections


def tbr(user="Likes melodic rock and rates most albums 4.", item="Item: Night Drive. [pos] melodic [neg] short",
        match="The melodic style fits the user.", rate=" 4 ", sep="\n"):
    return sep.join([f"<analyze user>{user}</analyze user>", f"<analyze item>{item}</analyze item>",
                     f"<match>{match}</match>", f"<rate>{rate}</rate>"])


GOOD = tbr()
LONG = "very long reasoning " * 10_000  # 200,000 characters

# (case id, completion, template, expected format_ok, expected rating)
CASES = [
    ("good", GOOD, "tbr", True, 4.0),
    ("good_no_separators", tbr(sep=""), "tbr", True, 4.0),
    ("rating_4.5", tbr(rate="4.5"), "tbr", True, 4.5),
    ("rating_5.0", tbr(rate="5.0"), "tbr", True, 5.0),
    ("rating_1", tbr(rate="1"), "tbr", True, 1.0),
    ("rating_padded_3.0", tbr(rate=" \n 3.0 \n"), "tbr", True, 3.0),
    ("rating_trailing_point", tbr(rate="4."), "tbr", True, 4.0),
    ("rating_0", tbr(rate="0"), "tbr", False, None),
    ("rating_6", tbr(rate="6"), "tbr", False, None),
    ("rating_5.01", tbr(rate="5.01"), "tbr", False, None),
    ("rating_negative", tbr(rate="-1"), "tbr", False, None),
    ("rating_plus_sign", tbr(rate="+4"), "tbr", False, None),
    ("rating_4/5", tbr(rate="4/5"), "tbr", False, None),
    ("rating_five", tbr(rate="five"), "tbr", False, None),
    ("rating_4_stars", tbr(rate="4 stars"), "tbr", False, None),
    ("rating_with_words", tbr(rate="I would say 4"), "tbr", False, None),
    ("rating_two_numbers", tbr(rate="4 5"), "tbr", False, None),
    ("rating_empty", tbr(rate=""), "tbr", False, None),
    ("rating_nan", tbr(rate="nan"), "tbr", False, None),
    ("rating_inf", tbr(rate="inf"), "tbr", False, None),
    ("rating_exponent", tbr(rate="1e0"), "tbr", False, None),
    ("rating_underscore", tbr(rate="1_0"), "tbr", False, None),
    ("rating_arabic_digit", tbr(rate="\u0664"), "tbr", False, None),  # float() would read it as 4
    ("rating_fullwidth_digit", tbr(rate="\uff14"), "tbr", False, None),
    ("empty_string", "", "tbr", False, None),
    ("only_whitespace", " \n\t  \n", "tbr", False, None),
    ("no_tags_at_all", "I think the user will give it 4 stars.", "tbr", False, None),
    ("duplicated_section", GOOD.replace("<analyze item>", "<analyze user> again </analyze user>\n<analyze item>"),
     "tbr", False, 4.0),
    ("missing_match_closer", GOOD.replace("</match>", ""), "tbr", False, 4.0),
    ("missing_rate_closer", GOOD.replace("</rate>", ""), "tbr", False, None),
    ("missing_rate_opener", GOOD.replace("<rate>", ""), "tbr", False, None),
    ("close_before_open", GOOD.replace("<match>", "#").replace("</match>", "<match>").replace("#", "</match>"),
     "tbr", False, 4.0),
    ("wrong_order", "<analyze item> Night Drive. [pos] x </analyze item>\n<analyze user> rock </analyze user>\n"
                    "<match> fits </match>\n<rate> 4 </rate>", "tbr", False, 4.0),
    ("nested_sections", "<analyze user> rock <analyze item> Night Drive [pos] x </analyze item> </analyze user>\n"
                        "<match> fits </match>\n<rate> 4 </rate>", "tbr", False, 4.0),
    ("rate_inside_match", "<analyze user> a </analyze user><analyze item> b </analyze item>"
                          "<match> c <rate> 4 </rate> </match>", "tbr", False, 4.0),
    ("empty_section", tbr(match="   \n "), "tbr", False, 4.0),
    ("empty_user_section", tbr(user=""), "tbr", False, 4.0),
    ("two_rate_blocks_last_wins", GOOD + "\n<rate> 2 </rate>", "tbr", False, 2.0),
    ("two_rate_blocks_last_bad", GOOD + "\n<rate> five </rate>", "tbr", False, None),
    ("unclosed_trailing_rate", GOOD + "\n<rate> 2", "tbr", False, 4.0),
    ("case_variant_tags", GOOD.replace("<rate>", "<Rate>").replace("</rate>", "</Rate>"), "tbr", False, None),
    ("uppercase_section", GOOD.replace("analyze user>", "Analyze User>"), "tbr", False, 4.0),
    ("underscored_tags", GOOD.replace("analyze user", "analyze_user").replace("analyze item", "analyze_item"),
     "tbr", False, 4.0),
    ("tags_without_space", GOOD.replace("analyze user", "analyzeuser"), "tbr", False, 4.0),
    ("rated_is_not_rate", GOOD.replace("<rate>", "<rated>").replace("</rate>", "</rated>"), "tbr", False, None),
    ("rated_decoy_before", GOOD.replace("<match>", "<match> <rated> 1 </rated>"), "tbr", True, 4.0),
    ("spaced_tag_variant", GOOD.replace("<rate>", "< rate >"), "tbr", False, None),
    ("trailing_im_end", GOOD + "<|im_end|>", "tbr", True, 4.0),
    ("trailing_eos_padding", GOOD + "\n<|im_end|><|im_end|><|im_end|>\n", "tbr", True, 4.0),
    ("trailing_endoftext", GOOD + "<|endoftext|>", "tbr", True, 4.0),
    ("trailing_whitespace", GOOD + "\n\n  ", "tbr", True, 4.0),
    ("text_after_rate", GOOD + "\nHope this helps!", "tbr", False, 4.0),
    ("text_after_eos", GOOD + "<|im_end|> more", "tbr", False, 4.0),
    ("eos_inside_gap", GOOD.replace("\n<match>", "<|im_end|><match>"), "tbr", False, 4.0),
    ("preamble", "Sure! Here is my analysis.\n" + GOOD, "tbr", False, 4.0),
    ("text_between_sections", GOOD.replace("\n<match>", "\nNow the match:\n<match>"), "tbr", False, 4.0),
    ("leading_whitespace", "\n\n " + GOOD, "tbr", True, 4.0),
    ("chinese_and_emoji", tbr(user="喜欢摇滚乐 🎸", item="物品：夜行。[pos] 旋律 [neg] 太短 😅", match="很适合 ✅"),
     "tbr", True, 4.0),
    ("very_long_200k", tbr(user=LONG), "tbr", True, 4.0),
    ("very_long_garbage", LONG + "<rate", "tbr", False, None),
    ("lone_surrogate", tbr(user="odd \ud800 char"), "tbr", True, 4.0),
    ("answer_only_ok", "<rate> 4 </rate>", "answer_only", True, 4.0),
    ("answer_only_ok_with_eos", " <rate>3.5</rate><|im_end|>", "answer_only", True, 3.5),
    ("answer_only_thinks_first", "<think> rock fan </think>\n<rate> 4 </rate>", "answer_only", False, 4.0),
    ("answer_only_given_tbr", GOOD, "answer_only", False, 4.0),
    ("tbr_given_only_rate", "<rate> 4 </rate>", "tbr", False, 4.0),
    ("single_think_ok", "<think> The user likes rock; this is rock. </think>\n<rate> 4.5 </rate>", "single_think",
     True, 4.5),
    ("single_think_empty", "<think> </think>\n<rate> 4.5 </rate>", "single_think", False, 4.5),
    ("single_think_given_tbr", GOOD, "single_think", False, 4.0),
]


@pytest.mark.parametrize("text, template, format_ok, rating", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_table(text, template, format_ok, rating):
    result = parse_completion(text, template)
    assert isinstance(result, ParseResult)
    assert result.format_ok is format_ok, result.error
    assert result.rating == rating
    assert (result.error is None) == format_ok
    if not format_ok:
        assert "internal" not in result.error


def test_table_is_large_enough():
    assert len(CASES) >= 30
    assert sum(c[3] for c in CASES) >= 10 and sum(not c[3] for c in CASES) >= 20


def test_sections_hold_stripped_contents_of_last_blocks():
    result = parse_completion(tbr(user="  rock  ", rate=" 4.5 "))
    assert result.sections == {"analyze user": "rock", "analyze item": "Item: Night Drive. [pos] melodic [neg] short",
                               "match": "The melodic style fits the user.", "rate": "4.5"}
    result = parse_completion(GOOD + "<rate> 2 </rate>")
    assert result.sections["rate"] == "2"
    assert parse_completion("<analyze user> a").sections == {}


def test_error_messages_name_the_broken_rule():
    assert parse_completion(GOOD.replace("</match>", "")).error == "</match> occurs 0 times, expected exactly once"
    assert parse_completion(GOOD + "<rate> 2 </rate>").error == "<rate> occurs 2 times, expected exactly once"
    assert parse_completion(tbr(match=" ")).error == "<match> section is empty"
    assert "not a plain number" in parse_completion(tbr(rate="4/5")).error
    assert parse_completion(GOOD + " ok").error == "text after </rate>"
    assert parse_completion("hi " + GOOD).error == "text outside the sections before <analyze user>"
    assert parse_completion(None).error == "completion is None"
    assert "before" in parse_completion(CASES[[c[0] for c in CASES].index("wrong_order")][1]).error


def test_rating_scale_keywords():
    assert parse_completion(tbr(rate="8"), rating_min=1, rating_max=10).rating == 8.0
    assert parse_completion(tbr(rate="8"), rating_min=1, rating_max=10).format_ok
    assert parse_completion(tbr(rate="1"), rating_min=2.0, rating_max=5.0).rating is None


@pytest.mark.parametrize("text, format_ok", [
    ("Sure! Here is my analysis.\n" + GOOD, True),
    (GOOD.replace("\n<match>", "\nNow the match:\n<match>"), True),
    (GOOD + "\nHope this helps!", True),
    ("<think> rock </think>\n<rate> 4 </rate>", False),  # tbr still needs its four sections
    (GOOD + "\n<rate> 2 </rate>", False),  # duplicates are wrong under either rule
])
def test_paper_literal_rule_allows_outside_text(text, format_ok):
    assert parse_completion(text, strict_outside=False).format_ok is format_ok


@pytest.mark.parametrize("value", [None, b"", 42, 4.0, ["<rate> 4 </rate>"], {"a": 1}, object(), bytearray(b"\xff")])
def test_non_text_inputs_never_raise(value):
    result = parse_completion(value)
    assert result.format_ok is False and result.rating is None and result.error


def test_bytes_are_decoded():
    assert parse_completion(GOOD.encode("utf-8")) == parse_completion(GOOD)
    assert parse_completion(b"\xff\xfe" + GOOD.encode()).format_ok is False  # U+FFFD before the first tag
    assert parse_completion(b"\xff\xfe" + GOOD.encode(), strict_outside=False).format_ok is True


def test_unknown_template_raises():
    with pytest.raises(ValueError, match="unknown template"):
        parse_completion(GOOD, "four_steps")


@pytest.mark.parametrize("text, expected", [
    ("4", 4.0), (" 4.5 ", 4.5), (".5", None), ("1.", 1.0), ("0.999", None), ("5.000", 5.0), ("05", 5.0),
    ("4,5", None), ("4.5.1", None), ("1" * 400, None), ("", None), ("   ", None), ("Infinity", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected
    assert parse_rating(None) is None


# ------------------------------------------------------------------------------------------------------------------
# Partial credit helper (used by the partial_format reward)
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (GOOD, ("analyze user", "analyze item", "match", "rate")),
    (GOOD + " trailing text", ("analyze user", "analyze item", "match", "rate")),
    (GOOD.replace("</match>", ""), ("analyze user", "analyze item", "rate")),
    (GOOD + "<rate> 2 </rate>", ("analyze user", "analyze item", "match")),
    (tbr(rate="nine"), ("analyze user", "analyze item", "match")),
    (tbr(user=" "), ("analyze item", "match", "rate")),
    ("<analyze item> b </analyze item><analyze user> a </analyze user><match> c </match><rate> 4 </rate>",
     ("analyze user", "match", "rate")),  # the longest in-order chain; a tie goes to template order
    ("<rate> 4 </rate>", ("rate",)),
    ("", ()),
    (None, ()),
])
def test_well_formed_sections(text, expected):
    assert well_formed_sections(text) == expected


# ------------------------------------------------------------------------------------------------------------------
# Fuzz: random outputs built from tag fragments, checked against an independent regex oracle
# ------------------------------------------------------------------------------------------------------------------

_EOT = r"(?:\s|<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|end_of_text\|>|<\|end\|>|<eos>|</s>)*"
_TAGS = ["<analyze user>", "</analyze user>", "<analyze item>", "</analyze item>", "<match>", "</match>",
         "<rate>", "</rate>"]


def oracle_format_ok(text: str, strict: bool) -> bool:
    """The format rule restated as one regex over the tbr template plus tag counts (independent of parse.py)."""
    if any(text.count(tag) != 1 for tag in _TAGS):
        return False
    gap = r"\s*" if strict else r".*?"
    pattern = (f"{gap}<analyze user>(.*?)</analyze user>{gap}<analyze item>(.*?)</analyze item>{gap}"
               f"<match>(.*?)</match>{gap}<rate>(.*?)</rate>" + (_EOT if strict else ".*"))
    m = re.fullmatch(pattern, text, flags=re.DOTALL)
    if not m or not all(m.group(i).strip() for i in (1, 2, 3)):
        return False
    number = m.group(4).strip()
    return bool(re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", number)) and 1.0 <= float(number) <= 5.0


_PIECES = _TAGS + ["<Rate>", "<rated>", "</rated>", "<analyze_user>", "< rate>", "<think>", "</think>", "<", ">",
                   "/", "4", "4.5", "5.0", "0", "6", "-1", "nan", "1e0", "4/5", "five", "\u0664", " ", "\n", "\t",
                   "<|im_end|>", "<|endoftext|>", "rock", "喜欢", "🎸", "\u200b", "[pos]", "[neg]", "\ud800", "\x00"]


def _mutate(rng: random.Random, text: str) -> str:
    i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
    op = rng.randrange(4)
    if op == 0:
        return text[:i] + text[j:]  # delete a span
    if op == 1:
        return text[:j] + text[i:j] + text[j:]  # duplicate a span
    if op == 2:
        return text[:i] + rng.choice(_PIECES) + text[i:]  # insert a piece
    return text + rng.choice(["", "<|im_end|>", "\n", " ok", "<rate> 3 </rate>"])


def test_fuzz_never_raises_and_agrees_with_oracle():
    rng = random.Random(1234)
    seen_ok = seen_bad = 0
    for trial in range(3000):
        if trial % 3 == 0:
            text = "".join(rng.choice(_PIECES) for _ in range(rng.randrange(40)))
        else:
            text = tbr(rate=rng.choice([" 4 ", "3.5", "5", "1.0", "0", "seven"]))
            for _ in range(rng.randrange(4)):
                text = _mutate(rng, text)
        for strict in (True, False):
            result = parse_completion(text, strict_outside=strict)
            assert result.error is None or "internal" not in result.error, (text, result)
            assert result.format_ok == oracle_format_ok(text, strict), (text, result)
            if result.format_ok:
                assert result.rating is not None and result.error is None
            if result.rating is not None:
                assert 1.0 <= result.rating <= 5.0 and math.isfinite(result.rating)
        seen_ok += result.format_ok
        seen_bad += not result.format_ok
    assert seen_ok > 200 and seen_bad > 200  # the fuzz exercises both verdicts


def test_fuzz_random_bytes_and_unicode_never_raise():
    rng = random.Random(7)
    for _ in range(300):
        raw = rng.randbytes(rng.randrange(200))
        assert parse_completion(raw).format_ok in (True, False)
        text = "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(100)))
        for template in ("tbr", "answer_only", "single_think"):
            result = parse_completion(text, template)
            assert result.error is None or "internal" not in result.error
            well_formed_sections(text, template)
