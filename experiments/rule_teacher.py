"""The rule-based cold-start teacher (`coldstart.teacher: rules`): each trace written from its example's own data.

A model this small, asked to write its own traces, writes text about nobody in particular; an external
teacher needs a network. This one needs neither. For each training example it writes the four steps as
plain statements of what the prompt shows:

- analyze user: how many items the user rated and how generously (their average against the training
  split's mean); two titles they rated highest and two lowest, with their ratings; the categories their
  liked items share.
- analyze item: the item's title and categories, its earlier reviewers' count and average, and either the
  summaries of its best- and worst-rated earlier reviews (`quotes=True`) or only their ratings
  (`quotes=False`: a 135M student decoding greedily fell into loops such as "Best (5): Best (5): ..." on
  8% of test rows when it had to reproduce a quote; see docs/results.md).
- match: which of the item's categories the user's liked items have, and the arithmetic of the rating
  (user average + item average - the usual rating).

The wording is terse on purpose: few words are the same from trace to trace, so nearly every run of six
words holds a title, a number or a quote of this example. Prose with a fixed skeleton ("The user rated N
items, X stars on average, below the usual ...") made 96% of 256 traces share over 30% of their word 6-grams
with another trace, which is the evaluation's definition of a copied answer (experiments/copying.py).
- rate: the bias rule, user average + item average - the split's mean, rounded to a whole star and kept
  on the scale: the user+item bias baseline without shrinkage, computed from the two averages the prompt
  states (so the student can learn to read them, and GRPO can then learn to do better than the rule).

Every number and title in a trace is a fact of the example; only the rating is a guess, and `coldstart`
keeps a trace only when that guess is within `coldstart.tolerance` of the label. Traces are kept short
(~70-140 tokens): GRPO cuts an answer at `sampling.max_new_tokens`, and a model taught longer answers
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


def _rated(entries: Sequence[dict]) -> str:
    return ", ".join(f'"{_title(e)}" ({_stars(float(e["rating"]))})' for e in entries) or "none"


def rule_trace(example: dict, global_mean: float, quotes: bool = True) -> str:
    """The four-step answer for one example (tbr template tags), every statement read off the example;
    `quotes` chooses between quoting the best and worst earlier reviews and stating only their ratings."""
    history = example.get("user_history") or []
    reviews = example.get("item_history") or []
    item = example.get("item") or {}
    scale = tuple(example.get("rating_scale") or (1.0, 5.0))
    user_avg, item_avg = example.get("user_avg_rating"), example.get("item_avg_rating")

    by_rating = sorted(history, key=lambda e: (-float(e["rating"]), str(e.get("title"))))
    liked = [e for e in by_rating if float(e["rating"]) >= LIKED]
    disliked = [e for e in reversed(by_rating) if float(e["rating"]) <= DISLIKED]
    liked_categories = Counter(c for e in liked for c in _categories(e))
    mean = _stars(user_avg) if user_avg is not None else "unknown"
    user = f"{len(history)} ratings, mean {mean}. Liked: {_rated(liked[:TITLES])}. Disliked: {_rated(disliked[:TITLES])}."
    if liked_categories:
        user += f" Liked genres: {', '.join(c for c, _ in liked_categories.most_common(2))}."

    item_categories = _categories(item)
    about = f'"{_title(item)}"' + (f" ({', '.join(item_categories[:2])})" if item_categories else "")
    if reviews and item_avg is not None:
        best = max(reviews, key=lambda r: float(r["rating"]))
        worst = min(reviews, key=lambda r: float(r["rating"]))
        about += f": {len(reviews)} earlier reviews, mean {_stars(item_avg)}"
        hi, lo = _stars(float(best["rating"])), _stars(float(worst["rating"]))
        if not quotes:
            about += f", from {lo} to {hi}." if lo != hi else f", all {hi}."
        else:
            about += f". Best ({hi}): {_summary(best)}."
            if lo != hi:
                about += f" Worst ({lo}): {_summary(worst)}."
    else:
        about += ": no earlier reviews."

    shared = [c for c in item_categories if c in liked_categories]
    rating = rule_rating(user_avg, item_avg, global_mean, scale)
    u = global_mean if user_avg is None else float(user_avg)
    i = global_mean if item_avg is None else float(item_avg)
    match = (f"Shared genres: {', '.join(shared[:2]) or 'none'}. "
             f"{_stars(u)} + {_stars(i)} - {_stars(global_mean)} = {_stars(u + i - global_mean)}, about {rating}.")
    return (f"<analyze user>\n{user}\n</analyze user>\n<analyze item>\n{about}\n"
            f"</analyze item>\n<match>\n{match}\n</match>\n<rate> {rating} </rate>")
