"""Prompt templates: message structure, the inputs shown, rendering with the real tokenizer, the token budget."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prompts import TEMPLATES, build_messages, parse_completion, render_prompt
from prompts.templates import _messages, _View, close_tag, open_tag, render_prompt_info, shown_example

TOKENIZER_DIR = (Path(os.environ.get("RECZERO_CACHE", Path.home() / ".cache" / "reczero")).expanduser()
                 / "SmolLM2-135M-Instruct")


def _review(*sentences):
    return " ".join(sentences)


# A hand-made Digital Music example in the schema recdata produces (texts already cut to the paper's limits).
EXAMPLE = {
    "user_id": "A2EFCYXHNK06IS",
    "item_id": "B000002KH3",
    "timestamp": 1_262_304_000,
    "rating": 4.0,
    "user_history": [
        {"item_id": "B00000DGUY", "title": "Rumours", "categories": [["CDs & Vinyl", "Pop"], ["CDs & Vinyl", "Rock"]],
         "brand": "Fleetwood Mac", "price": 9.99, "rating": 5.0, "timestamp": 1_200_000_000,
         "summary": "Timeless", "text": _review("Every song on this album is a keeper.",
                                                 "The harmonies are gorgeous and the production still sounds fresh.",
                                                 "I play it on every long drive."),
         "description": "The 1977 album by Fleetwood Mac, remastered."},
        {"item_id": "B00004T9UF", "title": "Kid A", "categories": ["CDs & Vinyl", "Alternative Rock"],
         "brand": "Radiohead", "price": "$11.49", "rating": 3.0, "timestamp": 1_210_000_000,
         "summary": "Too cold for me", "text": _review("I admire the ambition but I rarely want to listen to it.",
                                                        "Too many electronic textures and not enough songs.",
                                                        "Idioteque is great though."),
         "description": "Radiohead's fourth studio album,\nreleased in 2000."},
        {"item_id": "B000002UJQ", "title": "Tapestry", "categories": ["CDs & Vinyl", "Pop", "Singer-Songwriters"],
         "brand": "Carole King", "price": "", "rating": 5.0, "timestamp": 1_220_000_000,
         "summary": "", "text": _review("Warm, honest songwriting.", "Her voice feels like an old friend.",
                                        "A perfect Sunday morning record."),
         "description": ""},
        {"item_id": "B0000025RI", "title": "The Joshua Tree", "categories": [], "brand": "U2", "price": 7.5,
         "rating": 4.0, "timestamp": 1_230_000_000, "summary": "Big and soaring",
         "text": _review("The first three songs are untouchable.", "The second half drags a little for me.",
                         "Still a great album for a road trip."),
         "description": "U2's fifth studio album, produced by Daniel Lanois and Brian Eno. " * 3},
        {"item_id": "B00008OWZG", "title": "Elephant", "categories": ["CDs & Vinyl", "Rock"],
         "brand": "The White Stripes", "price": 10.0, "rating": 2.0, "timestamp": 1_240_000_000,
         "summary": "Too raw", "text": _review("The guitar tone is harsh and the songs blur together.",
                                                "I wanted more melody.") * 2,
         "description": "The fourth album by The White Stripes."},
        {"item_id": "B00012FXSE", "title": "Hotel California", "categories": ["CDs & Vinyl", "Classic Rock"],
         "brand": "Eagles", "price": 8.99, "rating": 5.0, "timestamp": 1_250_000_000,
         "summary": "Classic", "text": _review("Smooth harmonies, great guitar solos, great stories.",
                                               "This is exactly the sound I love."),
         "description": "The Eagles' fifth studio album."},
    ],
    "user_avg_rating": 4.1428571,
    "item": {"title": "Graceland", "categories": [["CDs & Vinyl", "Pop"], ["CDs & Vinyl", "World Music"]],
             "brand": "Paul Simon", "price": 12.98,
             "description": _review("Paul Simon's 1986 album, recorded with South African musicians.",
                                    "It blends pop songwriting with mbaqanga and isicathamiya.") * 3},
    "item_history": [
        {"user_id": "A1", "rating": 5.0, "timestamp": 1_100_000_000, "summary": "A joyful masterpiece",
         "text": _review("The rhythms are infectious and the lyrics are witty.", "Diamonds on the Soles of Her "
                         "Shoes is pure joy.") * 2},
        {"user_id": "A2", "rating": 4.0, "timestamp": 1_150_000_000, "summary": "Great melodies",
         "text": "Wonderful melodies, though a couple of tracks feel like filler."},
        {"user_id": "A3", "rating": 3.0, "timestamp": 1_180_000_000, "summary": "Not my style",
         "text": "I prefer his work with Garfunkel; the world music side did not grab me."},
        {"user_id": "A4", "rating": 5.0, "timestamp": 1_190_000_000, "summary": "Still great",
         "text": "Still sounds fresh decades later. Great for a sunny drive."},
    ],
    "item_avg_rating": 4.25,
    "rating_scale": [1, 5],
}


class WordTokenizer:
    """A stand-in tokenizer: ChatML rendering, one token per whitespace-separated word; counts its calls."""

    def __init__(self):
        self.encode_calls = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert tokenize is False and add_generation_prompt is True
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        self.encode_calls += 1
        return text.split()


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if not (TOKENIZER_DIR / "tokenizer_config.json").exists():
        pytest.skip(f"default tokenizer not found at {TOKENIZER_DIR}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def user_turn(example=EXAMPLE, **kw):
    messages = build_messages(example, **kw)
    assert [m["role"] for m in messages] == ["system", "user"]
    return messages[1]["content"]


# ------------------------------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_instruction_names_each_section_tag_exactly_once(name):
    tmpl = TEMPLATES[name]
    text = user_turn(template=name)
    for section in tmpl.sections:
        assert text.count(open_tag(section)) == 1 and text.count(close_tag(section)) == 1, section
    # In order, and no tag of another template's sections.
    positions = [text.index(open_tag(s)) for s in tmpl.sections]
    assert positions == sorted(positions)
    for other in {s for t in TEMPLATES.values() for s in t.sections} - set(tmpl.sections):
        assert open_tag(other) not in text
    assert text.startswith(tmpl.instruction.format(lo="1", hi="5"))
    assert text.endswith(tmpl.closing)


def test_tbr_instruction_explains_the_four_steps():
    text = user_turn()
    for needle in ("[pos]", "[neg]", "user_avg_rating", "from 1 to 5", "decimals"):
        assert needle in text
    assert TEMPLATES["tbr"].sections == ("analyze user", "analyze item", "match", "rate")
    assert build_messages(EXAMPLE)[0]["content"] == TEMPLATES["tbr"].system_prompt


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_one_shot_example_is_marked_and_follows_the_format(name):
    tmpl = TEMPLATES[name]
    assert parse_completion(tmpl.one_shot_answer, name).format_ok
    text = user_turn(template=name, one_shot=True)
    assert tmpl.one_shot_answer in text and "only shows the answer FORMAT" in text
    for section in tmpl.sections:
        assert text.count(open_tag(section)) == 2  # the instruction's and the example's
    assert tmpl.one_shot_answer not in user_turn(template=name)


def test_inputs_shown():
    text = user_turn()
    lines = text.splitlines()
    # User history: "k. <title>, <rating>;" oldest first, then the entry's fields.
    headers = [line for line in lines if line[:2] in {f"{k}." for k in range(1, 10)}]
    assert headers[:6] == ["1. Rumours, 5;", "2. Kid A, 3;", "3. Tapestry, 5;", "4. The Joshua Tree, 4;",
                           "5. Elephant, 2;", "6. Hotel California, 5;"]
    assert headers[6:] == ["1. rating 5;", "2. rating 4;", "3. rating 3;", "4. rating 5;"]
    first = lines.index("1. Rumours, 5;")
    assert lines[first + 1:first + 7] == [
        "   categories: CDs & Vinyl, Pop, Rock",  # nested category paths flattened, duplicates dropped
        "   brand: Fleetwood Mac",
        "   price: 9.99",
        "   summary: Timeless",
        "   description: The 1977 album by Fleetwood Mac, remastered.",
        "   the user's review: " + EXAMPLE["user_history"][0]["text"],
    ]
    assert "   price: $11.49" in lines
    assert "   description: Radiohead's fourth studio album, released in 2000." in lines  # newline collapsed
    # Empty fields are left out (Tapestry has no price, summary or description).
    tapestry = lines[lines.index("3. Tapestry, 5;") + 1:lines.index("4. The Joshua Tree, 4;")]
    assert [line.split(":")[0].strip() for line in tapestry] == ["categories", "brand", "the user's review"]
    assert "user_avg_rating: 4.14" in lines
    assert "target_item_avg_rating: 4.25" in lines
    for line in ("title: Graceland", "categories: CDs & Vinyl, Pop, World Music", "brand: Paul Simon",
                 "price: 12.98"):
        assert line in lines
    assert "   summary: Not my style" in lines
    assert "   review: Wonderful melodies, though a couple of tracks feel like filler." in lines
    # Order of the blocks: instruction, user history, user average, item, item history, item average, closing.
    order = [text.index(s) for s in ("Step 1.", "1. Rumours", "user_avg_rating: 4.14", "title: Graceland",
                                      "1. rating 5;", "target_item_avg_rating", TEMPLATES["tbr"].closing)]
    assert order == sorted(order)


def test_prompt_does_not_depend_on_the_label_and_does_not_mutate_the_example():
    before = copy.deepcopy(EXAMPLE)
    messages = build_messages(EXAMPLE, one_shot=True)
    assert EXAMPLE == before
    assert build_messages({**EXAMPLE, "rating": 1.0}, one_shot=True) == messages


def test_sparse_example():
    sparse = {"user_id": "u", "item_id": "i", "rating": 3.0, "user_history": [], "item_history": [],
              "item": {"title": "", "categories": [], "brand": "", "price": None, "description": ""},
              "user_avg_rating": None, "item_avg_rating": float("nan")}
    text = user_turn(sparse)
    assert "(no earlier reviews)" in text and "(none)" in text
    assert "user_avg_rating: unknown" in text and "target_item_avg_rating: unknown" in text
    assert "title: (untitled item)" in text and "brand:" not in text
    assert user_turn({"rating": 3.0})  # every field missing still renders


def test_rating_scale_shown_in_instruction():
    text = user_turn({**EXAMPLE, "rating_scale": [1, 10]})
    assert "from 1 to 10" in text and "from 1 to 5" not in text
    assert "from 1 to 5" in user_turn({k: v for k, v in EXAMPLE.items() if k != "rating_scale"})


def test_system_prompt_override():
    messages = build_messages(EXAMPLE, system_prompt="You are a music critic.")
    assert messages[0] == {"role": "system", "content": "You are a music critic."}
    assert messages[1] == build_messages(EXAMPLE)[1]


# ------------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------------

def test_raw_chatml_string_is_exact():
    system, user = (m["content"] for m in build_messages(EXAMPLE, one_shot=True))
    expected = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert render_prompt(EXAMPLE, None, one_shot=True, raw_chatml=True) == expected
    # The tokenizer's template is not used in raw mode.
    assert render_prompt(EXAMPLE, WordTokenizer(), one_shot=True, raw_chatml=True) == expected


def test_real_tokenizer_renders_chatml(smollm2_tokenizer):
    text = render_prompt(EXAMPLE, smollm2_tokenizer)
    system, user = (m["content"] for m in build_messages(EXAMPLE))
    assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"{TEMPLATES['tbr'].closing}<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == 3 and text.count("<|im_end|>") == 2
    assert "SmolLM" not in text  # our system turn replaced the template's default one
    # SmolLM2's chat template is plain ChatML, so the hand-built string is the same text.
    assert text == render_prompt(EXAMPLE, smollm2_tokenizer, raw_chatml=True)
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    im_start = smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 3  # markers are single special tokens, not text


def test_real_tokenizer_every_template(smollm2_tokenizer):
    for name in TEMPLATES:
        text = render_prompt(EXAMPLE, smollm2_tokenizer, template=name, one_shot=True)
        assert text.endswith("<|im_start|>assistant\n")
        assert TEMPLATES[name].one_shot_answer in text


def test_rendering_needs_a_tokenizer_unless_raw():
    with pytest.raises(ValueError):
        render_prompt(EXAMPLE, None)
    with pytest.raises(ValueError):
        render_prompt(EXAMPLE, None, raw_chatml=True, max_prompt_tokens=100)
    with pytest.raises(ValueError):
        render_prompt(EXAMPLE, WordTokenizer(), max_prompt_tokens=0)
    with pytest.raises(ValueError, match="unknown template"):
        render_prompt(EXAMPLE, WordTokenizer(), template="cot")


# ------------------------------------------------------------------------------------------------------------------
# Token budget
# ------------------------------------------------------------------------------------------------------------------

def _instruction_intact(text, name="tbr", lo="1", hi="5"):
    tmpl = TEMPLATES[name]
    return tmpl.instruction.format(lo=lo, hi=hi) in text and tmpl.closing in text


def test_budget_not_needed_changes_nothing():
    tok = WordTokenizer()
    full = render_prompt(EXAMPLE, tok)
    n_words = len(full.split())
    info = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=n_words)
    assert info.text == full and info.fits and info.n_tokens == n_words
    assert (info.n_user_history, info.n_item_history, info.text_char_cap) == (6, 4, None)
    assert render_prompt_info(EXAMPLE, tok).n_tokens is None  # nothing counted without a budget


def test_budget_drops_oldest_history_first_alternating():
    tok = WordTokenizer()
    n_full = len(render_prompt(EXAMPLE, tok).split())
    info = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=n_full - 1)
    # One step: the user history is the longer list, so its oldest entry (Rumours) goes first.
    assert (info.n_user_history, info.n_item_history, info.text_char_cap) == (5, 4, None)
    assert "Rumours" not in info.text and "1. Kid A, 3;" in info.text
    assert info.fits and info.n_tokens <= n_full - 1 and _instruction_intact(info.text)
    # Tighter: entries go from the longer list each time (user on a tie) down to one each, newest kept.
    shown = []
    for budget in range(n_full, 0, -20):
        info = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=budget)
        shown.append((info.n_user_history, info.n_item_history))
    path = [(6, 4), (5, 4), (4, 4), (3, 4), (3, 3), (2, 3), (2, 2), (1, 2), (1, 1)]
    assert [p for p in path if p in shown] == sorted(set(shown), key=path.index)
    info = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=390)
    assert (info.n_user_history, info.n_item_history, info.text_char_cap) == (1, 1, None)
    assert "1. Hotel California, 5;" in info.text and "1. rating 5;" in info.text and "Graceland" in info.text


def test_shown_example_is_what_the_trimmed_prompt_shows():
    tok = WordTokenizer()
    one_each = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=390)
    shown = shown_example(EXAMPLE, one_each)
    assert [e["title"] for e in shown["user_history"]] == ["Hotel California"]  # the newest entry only
    assert shown["item_history"] == [EXAMPLE["item_history"][-1]] and shown["item"] == EXAMPLE["item"]
    assert shown["user_avg_rating"] == EXAMPLE["user_avg_rating"] and EXAMPLE["user_history"][0]["title"] == "Rumours"
    cut = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=one_each.n_tokens - 30)
    shown = shown_example(EXAMPLE, cut)
    description = shown["item"]["description"]
    assert description.endswith("...") and len(description) <= cut.text_char_cap
    assert f"description: {description}" in cut.text  # cut exactly as the prompt cuts it


def test_budget_then_shortens_longest_texts():
    tok = WordTokenizer()
    one_each = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=390)
    assert (one_each.n_user_history, one_each.n_item_history, one_each.text_char_cap) == (1, 1, None)
    budget = one_each.n_tokens - 30
    info = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=budget)
    assert info.fits and info.n_tokens <= budget and len(info.text.split()) == info.n_tokens
    assert (info.n_user_history, info.n_item_history) == (1, 1)
    cap = info.text_char_cap
    assert cap is not None and 0 < cap < len(EXAMPLE["item"]["description"])
    # The longest field (the item description) is cut with "..."; short ones are untouched.
    description = next(line for line in info.text.splitlines() if line.startswith("description: Paul Simon"))
    assert description.endswith("...") and len(description) <= len("description: ") + cap
    assert "   summary: Classic" in info.text
    assert _instruction_intact(info.text)
    for tag in ("<analyze user>", "</analyze user>", "<analyze item>", "</analyze item>", "<match>", "</match>",
                "<rate>", "</rate>"):
        assert info.text.count(tag) == 1
    # The cap is the largest that fits (binary search): one character more does not.
    longer = tok.apply_chat_template(_messages(EXAMPLE, TEMPLATES["tbr"], False, None, _View(1, 1, cap + 1)))
    assert len(longer.split()) > budget


def test_budget_infeasible_returns_shortest_version_and_terminates():
    tok = WordTokenizer()
    info = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=10)
    assert not info.fits and info.n_tokens > 10
    assert (info.n_user_history, info.n_item_history, info.text_char_cap) == (1, 1, 0)
    assert _instruction_intact(info.text)
    assert "   the user's review: ..." in info.text
    # Bounded work: 1 full render + 8 drops + the shortest version + a binary search, or less.
    tok = WordTokenizer()
    render_prompt_info(EXAMPLE, tok, max_prompt_tokens=400)
    assert tok.encode_calls <= 1 + 8 + 1 + 12


def test_budget_fits_whenever_feasible_and_is_deterministic():
    tok = WordTokenizer()
    shortest = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=1).n_tokens
    full = len(render_prompt(EXAMPLE, tok).split())
    previous = 0
    for budget in range(shortest - 5, full + 5, 7):
        info = render_prompt_info(EXAMPLE, tok, max_prompt_tokens=budget, one_shot=True)
        assert info.fits == (budget >= info.n_tokens)
        if budget >= shortest + 200:  # the one-shot example adds fewer than 200 words
            assert info.fits
        assert info.n_tokens >= previous  # a larger budget never gives a shorter prompt
        previous = info.n_tokens
        assert render_prompt(EXAMPLE, tok, max_prompt_tokens=budget, one_shot=True) == info.text


def test_budget_with_real_tokenizer(smollm2_tokenizer):
    def count(text):
        return len(smollm2_tokenizer.encode(text, add_special_tokens=False))

    full = count(render_prompt(EXAMPLE, smollm2_tokenizer))
    assert full > 1000
    for budget in (full + 200, full, 1000, 750):  # the shortest version with the one-shot example is ~690
        info = render_prompt_info(EXAMPLE, smollm2_tokenizer, max_prompt_tokens=budget, one_shot=True)
        assert info.fits and count(info.text) == info.n_tokens <= budget
        assert info.text.endswith("<|im_start|>assistant\n") and _instruction_intact(info.text)
        assert TEMPLATES["tbr"].one_shot_answer in info.text
    raw = render_prompt_info(EXAMPLE, smollm2_tokenizer, max_prompt_tokens=600, raw_chatml=True)
    assert raw.fits and count(raw.text) <= 600 and raw.text_char_cap is not None


# ------------------------------------------------------------------------------------------------------------------
# Package hygiene
# ------------------------------------------------------------------------------------------------------------------

def test_prompts_does_not_import_torch():
    code = "import sys, prompts; assert 'torch' not in sys.modules, 'prompts imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_the_grounded_demonstration_quotes_only_its_own_inputs():
    # tbr_grounded's worked answer is about the demonstration's inputs: every quoted phrase is a title or review
    # words of `_SHOT_EXAMPLE`, and its numbers are that example's count, averages and ratings.
    import re

    from prompts.templates import _SHOT_EXAMPLE, TEMPLATES

    answer = TEMPLATES["tbr_grounded"].one_shot_answer
    history, item, reviews = _SHOT_EXAMPLE["user_history"], _SHOT_EXAMPLE["item"], _SHOT_EXAMPLE["item_history"]
    inputs = " ".join([*(f"{e['title']} {e['summary']} {e['text']}" for e in history), item["title"],
                       item["description"], *(f"{r['summary']} {r['text']}" for r in reviews)])
    quoted = re.findall(r'"([^"]+)"', answer)
    assert len(quoted) >= 6 and all(q in inputs for q in quoted), [q for q in quoted if q not in inputs]
    assert f"rated {len(history)} items, {_SHOT_EXAMPLE['user_avg_rating']} stars on average" in answer
    assert f"its {len(reviews)} earlier reviewer gave it {reviews[0]['rating']} stars" in answer
    assert TEMPLATES["tbr_grounded"].instruction == TEMPLATES["tbr"].instruction  # only the demonstration differs
