"""Rule-based rewards on the completion text (docs/paper.md, "Reward"), registered by name in REWARDS.

Every reward is a pure function `reward(completion_text, example, *, template="tbr", strict_outside=True)
-> (total, parts)`:
  - the label y is `example["rating"]`, the scale `example.get("rating_scale", [1, 5])`, max_error = hi - lo;
  - y_hat is the rating parsed from the completion (prompts.parse: the last `<rate>` block);
  - `template` picks the sections the format check expects, `strict_outside` is passed to the parser (True: only
    whitespace outside the sections; False: the paper's literal rule);
  - `parts` = {"format": format term, "answer": answer term (total = format + answer),
               "format_ok": 1.0 / 0.0, "abs_error": |y - y_hat| or nan when no rating was parsed} for logging.
`reward_range(name, rating_scale)` gives each reward's (lo, hi).

A completion that cannot be parsed never raises (the parser never does); a missing or non-numeric label is a data
bug and does raise.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from prompts.parse import ParseResult, parse_completion, well_formed_sections
from prompts.templates import PromptTemplate, get_template, rating_scale

RewardFn = Callable[..., tuple[float, dict[str, float]]]
REWARDS: dict[str, RewardFn] = {}
# name -> function of the rating scale (lo, hi) giving the reward's (min, max).
_RANGES: dict[str, Callable[[float, float], tuple[float, float]]] = {}


def _register(name: str, value_range: Callable[[float, float], tuple[float, float]]):
    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        _RANGES[name] = value_range
        return fn
    return add


def reward_range(name: str, rating_scale: tuple[float, float] = (1.0, 5.0)) -> tuple[float, float]:
    """(lowest, highest) total the reward `name` can give on `rating_scale`."""
    if name not in _RANGES:
        raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)}")
    lo, hi = (float(v) for v in rating_scale)
    return _RANGES[name](lo, hi)


def _judge(completion_text: Any, example: Mapping[str, Any], template: str | PromptTemplate,
           strict_outside: bool) -> tuple[ParseResult, float, float]:
    """(parse result, label y, max_error)."""
    lo, hi = rating_scale(example)
    y = float(example["rating"])
    result = parse_completion(completion_text, template, rating_min=lo, rating_max=hi, strict_outside=strict_outside)
    return result, y, hi - lo


def _parts(format_term: float, answer_term: float, result: ParseResult, y: float) -> tuple[float, dict[str, float]]:
    abs_error = math.nan if result.rating is None else abs(y - result.rating)
    return format_term + answer_term, {"format": format_term, "answer": answer_term,
                                       "format_ok": float(result.format_ok), "abs_error": abs_error}


@_register("paper", lambda lo, hi: (-0.5, 1.5))
def paper_reward(completion_text: Any, example: Mapping[str, Any], *, template: str | PromptTemplate = "tbr",
                 strict_outside: bool = True) -> tuple[float, dict[str, float]]:
    """The paper's reward (the default). Range [-0.5, 1.5].

    format: +0.5 if the format is right, else -0.5. answer: 1 - |y - y_hat| / max_error (in [0, 1]) when the
    format is right, else 0. So a malformed output scores -0.5, a well-formed one 0.5 to 1.5.
    """
    result, y, max_error = _judge(completion_text, example, template, strict_outside)
    if not result.format_ok:
        return _parts(-0.5, 0.0, result, y)
    return _parts(0.5, 1.0 - abs(y - result.rating) / max_error, result, y)


@_register("authors_code", lambda lo, hi: (min(-1.0, 2.0 - (hi - lo) / 2.0), 2.0))
def authors_code_reward(completion_text: Any, example: Mapping[str, Any], *,
                        template: str | PromptTemplate = "tbr",
                        strict_outside: bool = True) -> tuple[float, dict[str, float]]:
    """The authors' released code. Range [-1, 2] on a 1-5 scale.

    format: +1 if right, else -1. answer: 1 - |y - y_hat| / 2 when the format is right (in [-1, 1] on a 1-5 scale:
    the divisor is the code's constant 2, not max_error), else 0. A malformed output totals -1; a well-formed one
    0 to 2 (on a wider scale the answer term can go lower: see reward_range).
    """
    result, y, _ = _judge(completion_text, example, template, strict_outside)
    if not result.format_ok:
        return _parts(-1.0, 0.0, result, y)
    return _parts(1.0, 1.0 - abs(y - result.rating) / 2.0, result, y)


@_register("exact_match", lambda lo, hi: (-1.5, 2.0))
def exact_match_reward(completion_text: Any, example: Mapping[str, Any], *, template: str | PromptTemplate = "tbr",
                       strict_outside: bool = True) -> tuple[float, dict[str, float]]:
    """The paper's exact-match ablation. Range [-1.5, 2].

    +2 when the format is right and y_hat equals the (integer) label exactly ("4" and "4.0" count for 4; "4.4"
    does not: no rounding, which is what pushes the model to integer answers), else -1.5. Split for logging: a
    malformed output gets format -1.5 and answer 0; a well-formed one gets format 0 and answer +2 or -1.5.
    """
    result, y, _ = _judge(completion_text, example, template, strict_outside)
    if not result.format_ok:
        return _parts(-1.5, 0.0, result, y)
    return _parts(0.0, 2.0 if result.rating == y else -1.5, result, y)


@_register("format_only", lambda lo, hi: (-0.5, 0.5))
def format_only_reward(completion_text: Any, example: Mapping[str, Any], *, template: str | PromptTemplate = "tbr",
                       strict_outside: bool = True) -> tuple[float, dict[str, float]]:
    """Only the paper's format term: +0.5 if the format is right, else -0.5 (answer always 0). Range [-0.5, 0.5]."""
    result, y, _ = _judge(completion_text, example, template, strict_outside)
    return _parts(0.5 if result.format_ok else -0.5, 0.0, result, y)


@_register("answer_only", lambda lo, hi: (0.0, 1.0))
def answer_only_reward(completion_text: Any, example: Mapping[str, Any], *, template: str | PromptTemplate = "tbr",
                       strict_outside: bool = True) -> tuple[float, dict[str, float]]:
    """Only the paper's answer term, without the format requirement. Range [0, 1].

    answer: 1 - |y - y_hat| / max_error whenever the last `<rate>` block holds a plain number in range (even if
    the rest of the format is wrong), else 0 -- no rating scores like the worst possible rating, so guessing
    always pays at least as much as saying nothing. format: always 0 (format_ok is still logged).
    """
    result, y, max_error = _judge(completion_text, example, template, strict_outside)
    answer = 0.0 if result.rating is None else 1.0 - abs(y - result.rating) / max_error
    return _parts(0.0, answer, result, y)


@_register("partial_format", lambda lo, hi: (-0.5, 1.5))
def partial_format_reward(completion_text: Any, example: Mapping[str, Any], *,
                          template: str | PromptTemplate = "tbr",
                          strict_outside: bool = True) -> tuple[float, dict[str, float]]:
    """The paper's reward with partial format credit, for small models that rarely get the whole format right
    (then every completion scores -0.5, every group has zero variance and GRPO learns nothing). Range [-0.5, 1.5].

    Format right: exactly the paper's reward, 0.5 + answer, in [0.5, 1.5].
    Format wrong: format = -0.5 + (0.5 / n_sections) * k, answer 0, where k counts the sections that are right on
    their own and in order (prompts.parse.well_formed_sections: tags once each, non-empty, a valid rating; a
    duplicated tag forfeits its section). For tbr each section is worth 0.125, so a malformed output scores
    -0.5 to 0.0 (0.0: all four sections fine but text outside them). Any well-formed output thus beats any
    malformed one, and among malformed ones, more correct structure scores higher.
    """
    result, y, max_error = _judge(completion_text, example, template, strict_outside)
    if result.format_ok:
        return _parts(0.5, 1.0 - abs(y - result.rating) / max_error, result, y)
    lo, hi = rating_scale(example)
    sections = get_template(template).sections
    k = len(well_formed_sections(completion_text, template, rating_min=lo, rating_max=hi))
    return _parts(-0.5 + 0.5 * k / len(sections), 0.0, result, y)
