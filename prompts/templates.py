"""Prompt templates: turn one example (a user's review history + a target item) into a chat prompt.

The default template is the paper's "Think-before-Recommendation" (tbr) format (docs/paper.md, "Output structure"):
the model writes four tagged sections, in order, each exactly once (tag names contain a space):

    <analyze user> ... </analyze user>   the user's preferences, read from the review history
    <analyze item> ... </analyze item>   the item's name, [pos] points the user may like, [neg] points they may not
    <match> ... </match>                 why the item does or does not fit this user
    <rate> N </rate>                     only the number, on the rating scale (1-5), decimals allowed

Two ablation templates from the paper share the same inputs and change only the requested output:
`answer_only` (just `<rate> N </rate>`) and `single_think` (`<think> ... </think>` then `<rate> N </rate>`).

A prompt is a system turn (a short role) and a user turn: the instruction (task, steps, output format), an
optional one-shot example of the format, the inputs (docs/paper.md, "What goes into a prompt"), and a closing line.
The instruction text is our own wording, not the paper's.

Everything here is a pure function of an example dict and a duck-typed tokenizer (any object with
`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)` and
`encode(text, add_special_tokens=False)`); nothing imports torch.

Token budget (`max_prompt_tokens`): a prompt that is too long is shortened deterministically, only in its inputs,
never in the instruction or format text:
  1. drop history entries, oldest first, alternating between the user's and the item's history (always from the
     longer list; user history first on a tie), keeping at least one entry of each;
  2. cap every free-text field (review summaries, review texts, descriptions) at the same number of characters,
     cut with "..." -- the cap hits the longest fields first; a binary search finds the largest cap that fits;
  3. if even the shortest version (one entry each, every free-text field reduced to "...") is too long, that
     shortest version is returned (`render_prompt_info(...).fits` says so).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

DEFAULT_RATING_SCALE = (1.0, 5.0)
# Fields of history entries / the item that hold free text; the token budget shortens these and nothing else.
FREE_TEXT_FIELDS = ("summary", "description", "text")


# ----------------------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------------------

def open_tag(section: str) -> str:
    return f"<{section}>"


def close_tag(section: str) -> str:
    return f"</{section}>"


@dataclass(frozen=True)
class PromptTemplate:
    """One output format: which tagged sections the model must write and how the prompt asks for them."""

    name: str
    sections: tuple[str, ...]
    """Tag names in the order the model must write them; the last one holds the rating."""
    system_prompt: str
    """The default system turn (a short role); `render_prompt(system_prompt=...)` replaces it."""
    instruction: str
    """Task and output format, at the start of the user turn; `{lo}` / `{hi}` become the rating scale."""
    one_shot_answer: str
    """A made-up answer in exactly the requested format (shown only with `one_shot=True`)."""
    closing: str
    """The last line of the user turn, after the inputs: asks for the answer without repeating any tag."""

    def __post_init__(self) -> None:
        assert self.sections and self.sections[-1] == "rate", "the last section must be the <rate> answer"
        assert len(set(self.sections)) == len(self.sections), "section names must be distinct"

    @property
    def answer_section(self) -> str:
        return self.sections[-1]

    @property
    def reasoning_sections(self) -> tuple[str, ...]:
        """The sections that must be non-empty text (all but the rating)."""
        return self.sections[:-1]


_TASK = ("Your task: predict the star rating, from {lo} to {hi}, that this user will give to the target item. "
         "Base it on the user's earlier reviews and on what is known about the item and how others rated it.")

_TBR_INSTRUCTION = _TASK + """

Work in four steps, in this order. Write each step exactly once, inside its own pair of tags:

Step 1. <analyze user> ... </analyze user>
Describe the user's preferences as shown by the review history: what they enjoy, what they dislike, and whether \
they rate generously or strictly (compare with user_avg_rating).

Step 2. <analyze item> ... </analyze item>
Name the item. Then list the points this user may like, each starting with [pos], and the points this user may \
dislike, each starting with [neg].

Step 3. <match> ... </match>
Weigh the [pos] and [neg] points against the user's preferences and explain why the item does or does not suit \
this user.

Step 4. <rate> N </rate>
Write only the predicted rating N: a number from {lo} to {hi} (decimals such as 3.5 are allowed), no words.

Write nothing before the first step and nothing after the rating block."""

_TBR_ONE_SHOT = """<analyze user>
The user enjoys well-made, practical products and often praises good value. They complain about poor durability \
and usually give 4 stars, rarely 5.
</analyze user>
<analyze item>
Item: Example Product. [pos] sturdy build, which the user values [pos] fair price [neg] heavier than similar \
products the user reviewed
</analyze item>
<match>
The build quality and price fit what the user looks for; the weight is a small drawback for them, so they will \
probably like it without being thrilled.
</match>
<rate> 4 </rate>"""

# The same format, written the way experiments/rule_teacher.py writes traces: every statement is read off the
# demonstration's own inputs (`_SHOT_EXAMPLE`: its titles, ratings, averages and review words), so a model that
# imitates it learns to quote its prompt, where `_TBR_ONE_SHOT` (which does not describe its inputs) shows
# text about nobody in particular.
_TBR_GROUNDED_ONE_SHOT = """<analyze user>
The user rated 2 items, 4.5 stars on average: a generous rater. They liked "Example Album B" (5 stars, \
"Loved it", for its guitar work) and "Example Album A" (4 stars, "Solid songs", but "a little long"), both Rock.
</analyze user>
<analyze item>
Item: "Example Product" (Rock), a rock album with long guitar solos; its 1 earlier reviewer gave it 4 stars. \
[pos] Rock, like both albums the user liked [pos] "Strong guitars", which the user praised [neg] "a bit heavy", \
and long, which the user held against "Example Album A"
</analyze item>
<match>
The item offers the guitar rock this user rates 4-5 stars, with the length they marked down once. User average \
4.5 and item average 4: about 4 stars.
</match>
<rate> 4 </rate>"""

_ANSWER_ONLY_INSTRUCTION = _TASK + """

Answer with the rating only, exactly once, inside the rating tags:
<rate> N </rate>
N is a number from {lo} to {hi} (decimals such as 3.5 are allowed). Write no explanation, nothing before the \
rating block and nothing after it."""

_SINGLE_THINK_INSTRUCTION = _TASK + """

Answer in two parts, in this order, each exactly once:

<think> ... </think>
Reason step by step: the user's preferences, the item's strengths and weaknesses for this user, and how well \
they fit.

<rate> N </rate>
Write only the predicted rating N: a number from {lo} to {hi} (decimals such as 3.5 are allowed), no words.

Write nothing before the first part and nothing after the rating block."""

_SINGLE_THINK_ONE_SHOT = """<think>
The user values well-made, practical products and good prices, and usually gives 4 stars. The example product \
is sturdy and fairly priced, but heavier than what they usually buy, a small drawback for them.
</think>
<rate> 4 </rate>"""

_SYSTEM_REASONING = ("You are a recommendation assistant. You study a user's review history and the details of an "
                     "item, reason about them step by step, and predict how the user will rate the item.")
_SYSTEM_ANSWER_ONLY = ("You are a recommendation assistant. You study a user's review history and the details of "
                       "an item, and predict how the user will rate the item.")

TEMPLATES: dict[str, PromptTemplate] = {
    "tbr": PromptTemplate(
        name="tbr",
        sections=("analyze user", "analyze item", "match", "rate"),
        system_prompt=_SYSTEM_REASONING,
        instruction=_TBR_INSTRUCTION,
        one_shot_answer=_TBR_ONE_SHOT,
        closing="Now write your answer: the four tagged steps in order, ending with the rating block.",
    ),
    "answer_only": PromptTemplate(
        name="answer_only",
        sections=("rate",),
        system_prompt=_SYSTEM_ANSWER_ONLY,
        instruction=_ANSWER_ONLY_INSTRUCTION,
        one_shot_answer="<rate> 4 </rate>",
        closing="Now write your answer: only the rating block.",
    ),
    "single_think": PromptTemplate(
        name="single_think",
        sections=("think", "rate"),
        system_prompt=_SYSTEM_REASONING,
        instruction=_SINGLE_THINK_INSTRUCTION,
        one_shot_answer=_SINGLE_THINK_ONE_SHOT,
        closing="Now write your answer: the thinking block, then the rating block.",
    ),
}

TEMPLATES["tbr_grounded"] = replace(TEMPLATES["tbr"], name="tbr_grounded", one_shot_answer=_TBR_GROUNDED_ONE_SHOT)

# Frames the one-shot answer so that a small model reads it as a format demonstration, not as this item's answer.
_ONE_SHOT_HEADER = ("Here is an example that only shows the answer FORMAT. It is about an invented user and "
                    "product, not the ones below: do not copy its content or its rating.")
_ONE_SHOT_FOOTER = "(End of the format example.)"


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    """A template by name (a key of TEMPLATES) or the template itself. Unknown names raise ValueError."""
    if isinstance(template, PromptTemplate):
        return template
    try:
        return TEMPLATES[template]
    except (KeyError, TypeError):
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}") from None


def rating_scale(example: Mapping[str, Any] | None) -> tuple[float, float]:
    """(lo, hi) of the example's `rating_scale`, default (1, 5). A malformed scale is a data bug: ValueError."""
    scale = None if example is None else example.get("rating_scale")
    if scale is None:
        return DEFAULT_RATING_SCALE
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ValueError(f"rating_scale must be two numbers [lo, hi], got {scale!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"rating_scale must satisfy lo < hi, got {scale!r}")
    return lo, hi


# ----------------------------------------------------------------------------------------------------------------
# Formatting the inputs
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _View:
    """How much of an example a prompt shows: the token budget shrinks these, nothing else."""

    n_user: int  # newest `n_user` entries of user_history
    n_item: int  # newest `n_item` entries of item_history
    text_cap: int | None  # max characters of each free-text field; None: as given


def _flatten(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _flatten(v)]
    text = _text(value)
    return [text] if text else []


def _text(value: Any) -> str:
    """One line of text: None / NaN become "", lists are joined, runs of whitespace (newlines) become one space."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_flatten(value))
    return " ".join(str(value).split())


def _categories(value: Any) -> str:
    # Amazon-2014 metadata nests category paths (a list of lists) that repeat their top levels: flatten, dedupe.
    return ", ".join(dict.fromkeys(_flatten(value)))


def _price(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.2f}" if math.isfinite(value) else ""
    return _text(value)


def _number(value: Any) -> str:
    """A rating or an average: "4" for 4.0, "4.33" for 4.3333; "unknown" when missing or not a number."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "unknown"
    if not math.isfinite(x):
        return "unknown"
    if x == int(x):
        return str(int(x))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _cut(text: str, cap: int | None) -> str:
    """At most `cap` characters, "..." included, when `text` is longer than `cap`."""
    if cap is None or len(text) <= cap:
        return text
    return text[:max(cap - 3, 0)].rstrip() + "..."


def _newest(entries: Any, n: int) -> list[Mapping[str, Any]]:
    entries = [e for e in (entries or []) if isinstance(e, Mapping)]
    return entries[len(entries) - n:] if n > 0 else []


def _field_lines(pairs: Sequence[tuple[str, str]], indent: str) -> list[str]:
    return [f"{indent}{label}: {value}" for label, value in pairs if value]  # empty fields are left out


def _format_inputs(example: Mapping[str, Any], view: _View) -> str:
    cap = view.text_cap
    lines = ["## The user's review history (oldest first)"]
    user_history = _newest(example.get("user_history"), view.n_user)
    for k, entry in enumerate(user_history, start=1):
        title = _text(entry.get("title")) or "(untitled item)"
        lines.append(f"{k}. {title}, {_number(entry.get('rating'))};")  # docs/paper.md: "k. <item title>, <rating>;"
        lines += _field_lines([
            ("categories", _categories(entry.get("categories"))),
            ("brand", _text(entry.get("brand"))),
            ("price", _price(entry.get("price"))),
            ("summary", _cut(_text(entry.get("summary")), cap)),
            ("description", _cut(_text(entry.get("description")), cap)),
            ("the user's review", _cut(_text(entry.get("text")), cap)),
        ], indent="   ")
    if not user_history:
        lines.append("(no earlier reviews)")
    lines.append(f"user_avg_rating: {_number(example.get('user_avg_rating'))}")

    item = example.get("item")
    item = item if isinstance(item, Mapping) else {}
    lines += ["", "## The target item"]
    lines += _field_lines([
        ("title", _text(item.get("title")) or "(untitled item)"),
        ("categories", _categories(item.get("categories"))),
        ("brand", _text(item.get("brand"))),
        ("price", _price(item.get("price"))),
        ("description", _cut(_text(item.get("description")), cap)),
    ], indent="")
    lines.append("Earlier reviews of this item by other users (oldest first):")
    item_history = _newest(example.get("item_history"), view.n_item)
    for k, entry in enumerate(item_history, start=1):
        lines.append(f"{k}. rating {_number(entry.get('rating'))};")
        lines += _field_lines([
            ("summary", _cut(_text(entry.get("summary")), cap)),
            ("review", _cut(_text(entry.get("text")), cap)),
        ], indent="   ")
    if not item_history:
        lines.append("(none)")
    lines.append(f"target_item_avg_rating: {_number(example.get('item_avg_rating'))}")
    return "\n".join(lines)


def _longest_free_text(example: Mapping[str, Any], view: _View) -> int:
    item = example.get("item") if isinstance(example.get("item"), Mapping) else {}
    entries = (_newest(example.get("user_history"), view.n_user) + _newest(example.get("item_history"), view.n_item)
               + [item])
    return max((len(_text(e.get(f))) for e in entries for f in FREE_TEXT_FIELDS), default=0)


# ----------------------------------------------------------------------------------------------------------------
# Messages and rendering
# ----------------------------------------------------------------------------------------------------------------

# The invented example that `one_shot="turn"` shows as a finished earlier exchange (short, so it costs little).
_SHOT_EXAMPLE: dict[str, Any] = {
    "user_history": [
        {"title": "Example Album A", "rating": 4, "categories": ["Music", "Rock"],
         "summary": "Solid songs", "text": "Well played and well recorded, a little long."},
        {"title": "Example Album B", "rating": 5, "categories": ["Music", "Rock"],
         "summary": "Loved it", "text": "Great guitar work and catchy choruses."},
    ],
    "user_avg_rating": 4.5,
    "item": {"title": "Example Product", "categories": ["Music", "Rock"],
             "description": "A rock album with long guitar solos."},
    "item_history": [{"rating": 4, "summary": "Good", "text": "Strong guitars, a bit heavy."}],
    "item_avg_rating": 4.0,
}


def _messages(example: Mapping[str, Any], tmpl: PromptTemplate, one_shot: bool | str, system_prompt: str | None,
              view: _View) -> list[dict[str, str]]:
    lo, hi = rating_scale(example)
    instruction = tmpl.instruction.format(lo=_number(lo), hi=_number(hi))
    system = {"role": "system", "content": tmpl.system_prompt if system_prompt is None else system_prompt}
    if one_shot == "turn":
        # The demonstration as a finished earlier exchange: small chat models copy the format of their own
        # previous turn far more reliably than a format shown inside the instruction (measured: docs/results.md).
        shot_inputs = _format_inputs(_SHOT_EXAMPLE, _full_view(_SHOT_EXAMPLE))
        return [system,
                {"role": "user", "content": "\n\n".join([instruction, shot_inputs, tmpl.closing])},
                {"role": "assistant", "content": tmpl.one_shot_answer},
                {"role": "user", "content": "\n\n".join([_format_inputs(example, view), tmpl.closing])}]
    if one_shot not in (True, False):
        raise ValueError(f"one_shot must be True, False or 'turn', got {one_shot!r}")
    parts = [instruction]
    if one_shot:
        parts.append(f"{_ONE_SHOT_HEADER}\n{tmpl.one_shot_answer}\n{_ONE_SHOT_FOOTER}")
    parts += [_format_inputs(example, view), tmpl.closing]
    return [system, {"role": "user", "content": "\n\n".join(parts)}]


def _full_view(example: Mapping[str, Any]) -> _View:
    return _View(n_user=len(_newest(example.get("user_history"), 10**9)),
                 n_item=len(_newest(example.get("item_history"), 10**9)), text_cap=None)


def build_messages(example: Mapping[str, Any], template: str | PromptTemplate = "tbr", one_shot: bool = False,
                   system_prompt: str | None = None) -> list[dict[str, str]]:
    """[system, user] chat messages for `example`, showing all of its history (no token budget)."""
    return _messages(example, get_template(template), one_shot, system_prompt, _full_view(example))


def chatml(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """A raw ChatML string, built by hand (as the authors' code did) instead of with a tokenizer's template."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered prompt and what the token budget did to it (for logging how often prompts get trimmed)."""

    text: str
    n_tokens: int | None
    """Prompt length in tokens; None when no budget was given (nothing was counted)."""
    n_user_history: int
    """User-history entries shown (the newest ones)."""
    n_item_history: int
    """Item-history entries shown (the newest ones)."""
    text_char_cap: int | None
    """Character cap applied to every free-text field; None when no text was shortened."""
    fits: bool
    """False only when even the shortest version exceeds `max_prompt_tokens`."""


def render_prompt_info(example: Mapping[str, Any], tokenizer: Any = None, template: str | PromptTemplate = "tbr",
                       one_shot: bool | str = False, max_prompt_tokens: int | None = None, raw_chatml: bool = False,
                       system_prompt: str | None = None) -> RenderedPrompt:
    """`render_prompt`, also saying how the token budget shortened the prompt (see the module docstring)."""
    tmpl = get_template(template)
    if not raw_chatml and tokenizer is None:
        raise ValueError("a tokenizer is needed to apply its chat template (or pass raw_chatml=True)")
    if max_prompt_tokens is not None:
        if tokenizer is None:
            raise ValueError("max_prompt_tokens needs a tokenizer to count tokens")
        if int(max_prompt_tokens) < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")

    def render(view: _View) -> str:
        messages = _messages(example, tmpl, one_shot, system_prompt, view)
        if raw_chatml:
            return chatml(messages)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    def result(view: _View, text: str, n_tokens: int | None) -> RenderedPrompt:
        fits = max_prompt_tokens is None or n_tokens <= max_prompt_tokens
        return RenderedPrompt(text, n_tokens, view.n_user, view.n_item, view.text_cap, fits)

    view = _full_view(example)
    text = render(view)
    if max_prompt_tokens is None:
        return result(view, text, None)
    n_tokens = count(text)

    # 1. Drop history entries, oldest first, from the longer list (user history on a tie); keep one of each.
    min_user, min_item = min(view.n_user, 1), min(view.n_item, 1)
    while n_tokens > max_prompt_tokens and (view.n_user > min_user or view.n_item > min_item):
        if view.n_user > min_user and (view.n_user >= view.n_item or view.n_item == min_item):
            view = replace(view, n_user=view.n_user - 1)
        else:
            view = replace(view, n_item=view.n_item - 1)
        text = render(view)
        n_tokens = count(text)
    if n_tokens <= max_prompt_tokens:
        return result(view, text, n_tokens)

    # 2. Cap all free-text fields at one character count. Cap 0 (every field "...") is the shortest version: if
    #    it does not fit, nothing will. Otherwise binary-search the largest cap that fits: `fit_cap` always holds
    #    a cap that was rendered and fits, `too_long` one that does not (the longest field's length, uncut).
    longest = _longest_free_text(example, view)
    if longest == 0:
        return result(view, text, n_tokens)
    fit_cap, too_long = 0, longest
    best = replace(view, text_cap=0)
    best_text = render(best)
    best_tokens = count(best_text)
    if best_tokens > max_prompt_tokens:
        return result(best, best_text, best_tokens)
    while too_long - fit_cap > 1:
        mid = (fit_cap + too_long) // 2
        trial = replace(view, text_cap=mid)
        trial_text = render(trial)
        trial_tokens = count(trial_text)
        if trial_tokens <= max_prompt_tokens:
            fit_cap, best, best_text, best_tokens = mid, trial, trial_text, trial_tokens
        else:
            too_long = mid
    return result(best, best_text, best_tokens)


def shown_example(example: Mapping[str, Any], rendered: RenderedPrompt) -> dict[str, Any]:
    """The example as its prompt shows it: only the newest `rendered.n_user_history` / `n_item_history`
    entries, every free-text field cut as the token budget cut it. A teacher that writes from this states
    only what a model reading the prompt can see (with the default budget most prompts lose their oldest
    entries)."""
    cap = rendered.text_char_cap

    def cut(entry: Mapping[str, Any]) -> dict[str, Any]:
        return {k: _cut(_text(v), cap) if k in FREE_TEXT_FIELDS else v for k, v in entry.items()}

    item = example.get("item")
    return {**example, "user_history": [cut(e) for e in _newest(example.get("user_history"), rendered.n_user_history)],
            "item_history": [cut(e) for e in _newest(example.get("item_history"), rendered.n_item_history)],
            "item": cut(item) if isinstance(item, Mapping) else item}


def render_prompt(example: Mapping[str, Any], tokenizer: Any = None, template: str | PromptTemplate = "tbr",
                  one_shot: bool | str = False, max_prompt_tokens: int | None = None, raw_chatml: bool = False,
                  system_prompt: str | None = None) -> str:
    """The prompt text for `example`, ending with the assistant generation prompt.

    Rendered with `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`, or, with
    `raw_chatml=True`, as a hand-built ChatML string (then the tokenizer is only needed for `max_prompt_tokens`).
    With `max_prompt_tokens`, the inputs are shortened until the prompt fits (module docstring); if nothing fits,
    the shortest version is returned -- use `render_prompt_info` to find out.
    """
    return render_prompt_info(example, tokenizer, template=template, one_shot=one_shot,
                              max_prompt_tokens=max_prompt_tokens, raw_chatml=raw_chatml,
                              system_prompt=system_prompt).text
