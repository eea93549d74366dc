"""The rule-based cold-start teacher (`coldstart.teacher: rules`): each trace written from its example's own data.

A model this small, asked to write its own traces, writes text about nobody in particular; an external
teacher needs a network. This one needs neither. For each training example it writes the four steps as
plain statements of what the prompt shows:

- analyze user: how many items the user rated and how generously (their average against the training
  split's mean); two titles they rated highest and two lowest; the categories their liked items share.
- analyze item: the item's title and categories, its earlier reviewers' average, [pos] the summary of its
  best-rated earlier review and [neg] of its worst-rated one.
- match: which of the item's categories the user's liked items have, and the arithmetic of the rating
  (user average + item average - the usual rating).
- rate: the bias rule, user average + item average - the split's mean, rounded to a whole star and kept
  on the scale: the user+item bias baseline without shrinkage, computed from the two averages the prompt
  states (so the student can learn to read them, and GRPO can then learn to do better than the rule).

Every number and title in a trace is a fact of the example; only the rating is a guess, and `coldstart`
keeps a trace only when that guess is within `coldstart.tolerance` of the label. Traces are kept short
(~110-160 tokens): GRPO cuts an answer at `sampling.max_new_tokens`, and a model taught longer answers
would never reach its rating (`experiments.recone` drops pairs that do not fit).
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

LIKED, DISLIKED = 4.0, 2.0  # ratings at or above / at or below these count as liked / disliked
TITLES = 2  # titles quoted per side (a trace must fit sampling.max_new_tokens: ~100-150 tokens here)
SUMMARY_CHARS = 60  # a review summary is quoted up to this many characters
GENERIC_CATEGORIES = {"CDs & Vinyl", "Digital Music", "Music"}  # on nearly every item: they say nothing


def _title(entry: dict) -> str:
    return str(entry.get("title") or "").strip() or "an untitled item"


def _categories(entry: dict) -> list[str]:
    return [c for c in entry.get("categories") or [] if c not in GENERIC_CATEGORIES]


def _quote(titles: Sequence[str]) -> str:
    return ", ".join(f'"{t}"' for t in titles)


def _stars(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _summary(entry: dict) -> str:
    text = " ".join(str(entry.get("summary") or entry.get("text") or "").split())
    return text[:SUMMARY_CHARS].rstrip() or "no words given"


def rule_rating(user_avg: float | None, item_avg: float | None, global_mean: float,
                scale: tuple[float, float] = (1.0, 5.0)) -> int:
    """user average + item average - global mean, rounded to a whole star and clipped to the scale; a missing
    average counts as the global mean (no evidence either way)."""
    u = global_mean if user_avg is None else float(user_avg)
    i = global_mean if item_avg is None else float(item_avg)
    return int(min(max(round(u + i - global_mean), scale[0]), scale[1]))


def rule_trace(example: dict, global_mean: float) -> str:
    """The four-step answer for one example (tbr template tags), every statement read off the example."""
    history = example.get("user_history") or []
    reviews = example.get("item_history") or []
    item = example.get("item") or {}
    scale = tuple(example.get("rating_scale") or (1.0, 5.0))
    user_avg, item_avg = example.get("user_avg_rating"), example.get("item_avg_rating")

    by_rating = sorted(history, key=lambda e: (-float(e["rating"]), str(e.get("title"))))
    liked = [e for e in by_rating if float(e["rating"]) >= LIKED]
    disliked = [e for e in reversed(by_rating) if float(e["rating"]) <= DISLIKED]
    user = [f"The user rated {len(history)} items"]
    if user_avg is not None:
        side = "above" if user_avg > global_mean + 0.1 else "below" if user_avg < global_mean - 0.1 else "close to"
        user[0] += f", {_stars(user_avg)} stars on average, {side} the usual {_stars(global_mean)}"
    user[0] += "."
    if liked:
        user.append(f"They liked {_quote([_title(e) for e in liked[:TITLES]])}.")
    if disliked:
        user.append(f"They disliked {_quote([_title(e) for e in disliked[:TITLES]])}.")
    liked_categories = Counter(c for e in liked for c in _categories(e))
    if liked_categories:
        user.append(f"Their liked items are mostly {', '.join(c for c, _ in liked_categories.most_common(2))}.")

    item_categories = _categories(item)
    about = f'Item: "{_title(item)}"' + (f" ({', '.join(item_categories[:2])})" if item_categories else "") + "."
    lines = [about]
    if reviews and item_avg is not None:
        who = "earlier reviewer gave" if len(reviews) == 1 else "earlier reviewers gave"
        lines.append(f"Its {len(reviews)} {who} it {_stars(item_avg)} stars on average.")
        best = max(reviews, key=lambda r: float(r["rating"]))
        worst = min(reviews, key=lambda r: float(r["rating"]))
        lines.append(f"[pos] a {_stars(float(best['rating']))}-star review: {_summary(best)}")
        if float(worst["rating"]) < float(best["rating"]):
            lines.append(f"[neg] a {_stars(float(worst['rating']))}-star review: {_summary(worst)}")
        else:
            lines.append("[neg] no earlier reviewer rated it lower than that")
    else:
        lines.append("[pos] no earlier reviews [neg] no earlier reviews")

    shared = [c for c in item_categories if c in liked_categories]
    rating = rule_rating(user_avg, item_avg, global_mean, scale)
    match = [f"The item shares {', '.join(shared[:2])} with items the user liked." if shared else
             "The item shares no category with the items the user liked."]
    u = _stars(user_avg) if user_avg is not None else "unknown"
    i = _stars(item_avg) if item_avg is not None else "unknown"
    match.append(f"{u} + {i} - {_stars(global_mean)}: about {rating} stars.")
    return (f"<analyze user>\n{' '.join(user)}\n</analyze user>\n<analyze item>\n{' '.join(lines)}\n"
            f"</analyze item>\n<match>\n{' '.join(match)}\n</match>\n<rate> {rating} </rate>")
