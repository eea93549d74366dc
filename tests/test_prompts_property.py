"""Property tests of the completion parser and every reward (hypothesis): random and adversarial completions never
raise, every reward stays inside its `reward_range`, and whitespace around the tags never changes the verdict."""
import math
import re
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prompts import REWARDS, TEMPLATES, parse_completion, reward_range, well_formed_sections  # noqa: E402
from prompts.parse import END_OF_TURN_MARKERS  # noqa: E402
from prompts.templates import close_tag, open_tag  # noqa: E402

# No example database, and hypothesis's caches in the temp folder: nothing is written into the working tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "reczero-hypothesis")
SETTINGS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

ALL_TAGS = sorted({tag for t in TEMPLATES.values() for s in t.sections for tag in (open_tag(s), close_tag(s))})
# What a model (or an attacker) could put next to or inside the tags.
NUMBERS = ["4", "4.5", " 3.0 ", "4.", ".5", "0", "5", "6", "10", "-1", "+4", "1e0", "nan", "inf", "1_0", "٤", "4/5",
           "five", "4 stars", "9" * 400, "", "1" * 30 + ".5"]
WHITESPACE = [" ", "\n", "\t", "\r\n", "\u00a0", "\u2003", "\x1c", "\x0b", "\x0c", "\u3000", "\u2028"]
NEAR_TAGS = ["<Rate>", "<rate >", "<rated>", "</rate", "<analyze_user>", "< match>", "<<rate>>", "<>", "<", ">", "/>",
             "<rate><rate>", "</rate></rate>"]
FRAGMENT = st.one_of(st.sampled_from(ALL_TAGS), st.sampled_from(NUMBERS), st.sampled_from(WHITESPACE),
                     st.sampled_from(NEAR_TAGS), st.sampled_from(list(END_OF_TURN_MARKERS)),
                     st.text(max_size=12))
SPACES = st.lists(st.sampled_from(WHITESPACE), max_size=3).map("".join)
GOOD_RATINGS = ["1", "2", "3", "4", "5", "4.5", "3.0", "1.", ".5"]
WORDS = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), min_size=1, max_size=20)


@st.composite
def well_formed(draw, template):
    """A completion in the template's layout with random whitespace, contents and rating text: most are well
    formed, some break one rule (an empty section, an adversarial rating, text around the sections)."""
    parts = []
    for s in template.sections:
        if s == template.answer_section:
            content = draw(st.one_of(st.sampled_from(GOOD_RATINGS), st.sampled_from(GOOD_RATINGS),
                                     st.sampled_from(NUMBERS)))
        else:
            content = draw(st.one_of(WORDS.filter(str.strip), WORDS.filter(str.strip), st.sampled_from(WHITESPACE),
                                     st.text(max_size=20)))
        parts.append(draw(SPACES) + open_tag(s) + draw(SPACES) + content + draw(SPACES) + close_tag(s))
    tail = draw(st.sampled_from(["", "", "", *END_OF_TURN_MARKERS, "<|im_end|><|im_end|>", "\n",
                                 " I hope this helps."]))
    return "".join(parts) + draw(SPACES) + tail


@st.composite
def completions(draw):
    """(template name, completion): random text, a soup of tags and numbers, or a near-well-formed answer."""
    name = draw(st.sampled_from(sorted(TEMPLATES)))
    text = draw(st.one_of(st.text(max_size=200),
                          st.lists(FRAGMENT, max_size=30).map("".join),
                          well_formed(TEMPLATES[name]), well_formed(TEMPLATES[name])))
    return name, text


SCALES = st.sampled_from([(1.0, 5.0), (1.0, 10.0), (0.0, 1.0), (0.5, 5.0), (1.0, 2.0)])


@st.composite
def examples(draw):
    lo, hi = draw(SCALES)
    label = draw(st.one_of(st.integers(int(math.ceil(lo)), int(hi)).map(float),
                           st.integers(int(math.ceil(lo)), int(hi)).map(float),
                           st.floats(lo, hi, allow_nan=False, allow_infinity=False)))
    return {"rating": label, "rating_scale": [lo, hi]}


def add_whitespace_around_tags(text: str, tags, before: str, after: str, inside: str) -> str:
    """Every exact occurrence of a tag gets whitespace outside it (before an open tag, after a close tag) and
    inside its section (after an open tag, before a close tag)."""
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tags, key=len, reverse=True)))

    def spaced(m):
        tag = m.group(0)
        return before + tag + inside if not tag.startswith("</") else inside + tag + after
    return pattern.sub(spaced, text)


@SETTINGS
@given(completions(), SCALES, st.booleans())
def test_parser_never_raises_and_its_rating_is_in_scale(case, scale, strict):
    name, text = case
    result = parse_completion(text, name, rating_min=scale[0], rating_max=scale[1], strict_outside=strict)
    assert isinstance(result.format_ok, bool)
    assert result.rating is None or (math.isfinite(result.rating) and scale[0] <= result.rating <= scale[1])
    assert (result.error is None) == result.format_ok
    assert result.error is None or not result.error.startswith("internal parser error"), result.error
    if result.format_ok:
        assert result.rating is not None
        assert set(well_formed_sections(text, name, rating_min=scale[0], rating_max=scale[1])) == set(
            TEMPLATES[name].sections)


RIGHT = ("<analyze user>likes pop</analyze user><analyze item>a pop album</analyze item><match>fits</match>"
         "<rate>{}</rate>")
SCALE_1_5 = {"rating_scale": [1.0, 5.0]}


@SETTINGS
@given(completions(), examples(), st.booleans())
@example(("tbr", RIGHT.format(5)), {"rating": 5.0, **SCALE_1_5}, True)   # every reward's best case
@example(("tbr", RIGHT.format(5)), {"rating": 1.0, **SCALE_1_5}, True)   # the worst well-formed answer
@example(("tbr", RIGHT.format(1)), {"rating": 10.0, "rating_scale": [1.0, 10.0]}, True)  # authors_code's low end
@example(("tbr", "no tags"), {"rating": 3.0, **SCALE_1_5}, False)
def test_every_reward_is_inside_its_range(case, ex, strict):
    name, text = case
    lo, hi = ex["rating_scale"]
    for reward, fn in REWARDS.items():
        total, parts = fn(text, ex, template=name, strict_outside=strict)
        low, high = reward_range(reward, (lo, hi))
        assert math.isfinite(total) and low - 1e-9 <= total <= high + 1e-9, (reward, total, (low, high), text)
        assert total == pytest.approx(parts["format"] + parts["answer"])
        assert parts["format_ok"] in (0.0, 1.0)


@SETTINGS
@given(st.one_of(st.none(), st.integers(), st.binary(max_size=50), st.lists(st.text(max_size=5), max_size=3),
                 st.floats()), examples())
def test_non_text_completions_never_raise(completion, ex):
    assert not parse_completion(completion).format_ok or isinstance(completion, (bytes, str))
    for reward, fn in REWARDS.items():
        total, _ = fn(completion, ex)
        low, high = reward_range(reward, tuple(ex["rating_scale"]))
        assert low - 1e-9 <= total <= high + 1e-9


@SETTINGS
@given(completions(), SPACES, SPACES, SPACES, st.booleans())
@example(("tbr", RIGHT.format(4)), "\t", "\u00a0\n", "\x1c ", True)
@example(("tbr", RIGHT.format(4) + "<|im_end|>"), " ", "\r\n", "", True)
def test_whitespace_around_tags_does_not_change_the_verdict(case, before, after, inside, strict):
    name, text = case
    tags = [tag for s in TEMPLATES[name].sections for tag in (open_tag(s), close_tag(s))]
    spaced = add_whitespace_around_tags(text, tags, before, after, inside)
    a = parse_completion(text, name, strict_outside=strict)
    b = parse_completion(spaced, name, strict_outside=strict)
    assert (a.format_ok, a.rating) == (b.format_ok, b.rating), (text, spaced, a.error, b.error)


def test_whitespace_property_holds_on_a_known_answer():
    """The property test's transformation itself, on one answer: a right answer stays right."""
    text = RIGHT.format(4)
    tags = [tag for s in TEMPLATES["tbr"].sections for tag in (open_tag(s), close_tag(s))]
    spaced = add_whitespace_around_tags(text, tags, "\n", "\u00a0", "\x1c ")
    assert spaced != text and parse_completion(spaced).format_ok and parse_completion(spaced).rating == 4.0
