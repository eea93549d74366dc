"""Parse a completion: is its format right, and which rating does it give?

The format rule is the paper's (docs/paper.md, "Reward"), applied to the template's sections (tbr: analyze user,
analyze item, match, rate):
  1. every open and close tag of the template's sections occurs exactly once;
  2. they come in order: each section opens before it closes, and closes before the next section opens (so
     sections neither nest nor overlap, and follow the template's order);
  3. every reasoning section is non-empty after stripping whitespace;
  4. the `<rate>` content, stripped, is a plain number within [rating_min, rating_max].
Plus one rule of ours, on by default (`strict_outside=True`):
  5. outside the sections there is only whitespace, except that end-of-turn markers (`<|im_end|>`, ...) may
     follow the final `</rate>` (a completion decoded with its EOS / pad tokens).
Why rule 5: the `answer_only` ablation means nothing if the model may reason in free text before `<rate>`, and
text after `</rate>` is rambling that runs generation into the length limit and can hold a second number a
reader would take for the answer. A clean stop after the rating is also what makes generation short.
`strict_outside=False` gives the paper's literal rule (1-4 only).

Decisions (docs/grpo.md, trap 12):
- Tags match exactly: case-sensitive, with the template's spelling (one space in "analyze user"). `<Rate>`,
  `<analyze_user>`, `<rated>` are not tags; an exact tag string is found as a whole `<...>` token, so `<rate>`
  is never found inside `<rated>` or `</rate>`.
- A "plain number" is ASCII digits with an optional decimal point: "4", "4.5", " 3.0 ", "4.", ".5". Rejected:
  signs ("-1", "+4"), exponents ("1e0": the prompt asks for a plain number, and float() would also accept
  "nan", "inf", "1_0" and non-ASCII digits), fractions ("4/5"), words ("five", "4 stars"), and the empty string.
- `rating` comes from the LAST `<rate> ... </rate>` block (the last `</rate>` and the last `<rate>` before it),
  when its content is a plain number in range, whether or not the format is right: callers decide what to do.
- `sections` holds, for each section with a closed block, the stripped content of its last block (for logging).
- Never raises on any completion (None, bytes -- decoded as UTF-8 with replacement --, other objects, huge or
  odd unicode strings): bad input gives format_ok=False, rating=None and an `error`. An unknown template name is
  a programming error and does raise (ValueError).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from prompts.templates import PromptTemplate, close_tag, get_template, open_tag

# End-of-turn markers a decoded completion may end with (ChatML, Llama-3, Phi, Gemma, sentencepiece, GPT-2).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<eos>", "</s>")

_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")  # ASCII digits only: `\d` would take "٤" too
_WHITESPACE = re.compile(r"\s*")
# Whitespace and markers in any order and number (pad == eos repeats the marker). The alternatives start with
# different characters, so a failed match backtracks in linear time even on a huge string.
_END_FILLER = re.compile("(?:\\s|" + "|".join(re.escape(m) for m in END_OF_TURN_MARKERS) + ")*")


@dataclass(frozen=True)
class ParseResult:
    format_ok: bool
    """True when the completion follows the template's format (module docstring, rules 1-5)."""
    rating: float | None
    """The number in the last `<rate>` block if it is a plain number in range, else None; set even when
    format_ok is False."""
    sections: dict[str, str] = field(default_factory=dict)
    """Section name -> stripped content of its last closed block."""
    error: str | None = None
    """Why the format is wrong (the first rule broken); None when format_ok."""


def parse_rating(text: str, *, rating_min: float = 1.0, rating_max: float = 5.0) -> float | None:
    """The plain number in `text` (stripped) if it lies in [rating_min, rating_max], else None."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    value = float(text)  # cannot fail on a plain number; a 400-digit one gives inf, rejected next
    if not math.isfinite(value) or not rating_min <= value <= rating_max:
        return None
    return value


def _as_text(completion: Any) -> tuple[str | None, str | None]:
    """(text, None) or (None, error)."""
    if isinstance(completion, str):
        return completion, None
    if isinstance(completion, (bytes, bytearray)):
        return bytes(completion).decode("utf-8", errors="replace"), None
    if completion is None:
        return None, "completion is None"
    return None, f"completion is a {type(completion).__name__}, not text"


def _find_all(text: str, tag: str) -> list[int]:
    """Start offsets of every occurrence of the exact string `tag`."""
    found, start = [], text.find(tag)
    while start != -1:
        found.append(start)
        start = text.find(tag, start + len(tag))
    return found


def _last_block(text: str, opens: list[int], closes: list[int], open_len: int) -> str | None:
    """Content of the last closed block: the last close tag and the last open tag ending before it."""
    if not closes:
        return None
    end = closes[-1]
    starts = [o for o in opens if o + open_len <= end]
    return text[starts[-1] + open_len:end] if starts else None


def _scan(text: str, tmpl: PromptTemplate) -> dict[str, tuple[list[int], list[int]]]:
    return {s: (_find_all(text, open_tag(s)), _find_all(text, close_tag(s))) for s in tmpl.sections}


def _content_ok(tmpl: PromptTemplate, section: str, content: str, rating_min: float, rating_max: float) -> bool:
    if section == tmpl.answer_section:
        return parse_rating(content, rating_min=rating_min, rating_max=rating_max) is not None
    return bool(content.strip())


def _parse(text: str, tmpl: PromptTemplate, rating_min: float, rating_max: float,
           strict_outside: bool) -> ParseResult:
    tags = _scan(text, tmpl)
    sections: dict[str, str] = {}
    for s, (opens, closes) in tags.items():
        content = _last_block(text, opens, closes, len(open_tag(s)))
        if content is not None:
            sections[s] = content.strip()
    rating = parse_rating(sections.get(tmpl.answer_section, ""), rating_min=rating_min, rating_max=rating_max)

    def fail(error: str) -> ParseResult:
        return ParseResult(False, rating, sections, error)

    # Rule 1: each tag exactly once.
    for s, (opens, closes) in tags.items():
        for tag, found in ((open_tag(s), opens), (close_tag(s), closes)):
            if len(found) != 1:
                return fail(f"{tag} occurs {len(found)} times, expected exactly once")
    # Rule 2: open_1 < close_1 < open_2 < close_2 < ... (tags cannot overlap: each is one whole <...> token).
    sequence = [(tag, found[0]) for s, (opens, closes) in tags.items()
                for tag, found in ((open_tag(s), opens), (close_tag(s), closes))]
    for (tag_a, pos_a), (tag_b, pos_b) in zip(sequence, sequence[1:]):
        if pos_b < pos_a:
            return fail(f"{tag_b} comes before {tag_a}")
    # Rules 3 and 4: non-empty reasoning, a plain in-range number as the answer.
    for s in tmpl.reasoning_sections:
        if not sections[s]:
            return fail(f"{open_tag(s)} section is empty")
    if rating is None:
        return fail(f"{open_tag(tmpl.answer_section)} content {sections[tmpl.answer_section][:40]!r} is not a "
                    f"plain number in [{rating_min:g}, {rating_max:g}]")
    # Rule 5: only whitespace outside the sections; end-of-turn markers may follow the final close tag.
    if strict_outside:
        gaps = [0] + [pos + len(tag) for tag, pos in sequence[1::2]]  # where each gap starts: after a close tag
        for (tag, pos), gap_start in zip(sequence[0::2], gaps):
            if not _WHITESPACE.fullmatch(text, gap_start, pos):
                return fail(f"text outside the sections before {tag}")
        last_tag, last_pos = sequence[-1]
        if not _END_FILLER.fullmatch(text, last_pos + len(last_tag)):
            return fail(f"text after {last_tag}")
    return ParseResult(True, rating, sections, None)


def parse_completion(text: Any, template: str | PromptTemplate = "tbr", *, rating_min: float = 1.0,
                     rating_max: float = 5.0, strict_outside: bool = True) -> ParseResult:
    """Check a completion's format against `template` and read its rating (module docstring). Never raises."""
    tmpl = get_template(template)
    completion, error = _as_text(text)
    if completion is None:
        return ParseResult(False, None, {}, error)
    try:
        return _parse(completion, tmpl, float(rating_min), float(rating_max), strict_outside)
    except Exception as exc:  # noqa: BLE001 -- a parser bug must not stop a training run; the fuzz test hunts it
        return ParseResult(False, None, {}, f"internal parser error: {exc!r}")


def well_formed_sections(text: Any, template: str | PromptTemplate = "tbr", *, rating_min: float = 1.0,
                         rating_max: float = 5.0) -> tuple[str, ...]:
    """The largest set of sections that are each right on their own and come in the template's order.

    A section is right on its own when its open and close tags each occur exactly once, the open tag comes first,
    and its content is non-empty (the answer section: a plain number in range). Among those, the longest chain
    in template order whose blocks do not overlap is returned (a tie goes to the sections earlier in the
    template). Used by the
    `partial_format` reward. Text outside the sections is not looked at. Never raises.
    """
    tmpl = get_template(template)
    completion, _ = _as_text(text)
    if completion is None:
        return ()
    try:
        spans = []  # (section, open position, close position) of each section that is right on its own
        for s, (opens, closes) in _scan(completion, tmpl).items():
            if len(opens) == 1 and len(closes) == 1 and opens[0] < closes[0]:
                content = completion[opens[0] + len(open_tag(s)):closes[0]]
                if _content_ok(tmpl, s, content, float(rating_min), float(rating_max)):
                    spans.append((s, opens[0], closes[0]))
        # Longest chain: chain[i] = the best chain ending with spans[i] (spans are in template order).
        chains: list[list[tuple[str, int, int]]] = []
        for i, span in enumerate(spans):
            before = [chains[j] for j in range(i) if spans[j][2] < span[1]]
            chains.append(max(before, key=len, default=[]) + [span])
        return tuple(s for s, _, _ in max(chains, key=len, default=[]))
    except Exception:  # noqa: BLE001 -- see parse_completion
        return ()
