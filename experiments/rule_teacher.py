"""The rule-based cold-start teacher (`coldstart.teacher: rules`): each trace written from its example's own data.

A model this small, asked to write its own traces, writes text about nobody in particular; an external
teacher needs a network. This one needs neither. For each training example it writes the four steps as
plain statements of what the prompt shows, in one of two styles (`coldstart.style`):

- "counts" (the first one):
  - analyze user: how many items the user rated and how generously (their average); two titles they rated
    highest and two lowest, with their ratings; the categories their liked items share.
  - analyze item: the item's title and categories, its earlier reviewers' count and average, and either the
    summaries of its best- and worst-rated earlier reviews (`quotes=True`) or only their ratings
    (`quotes=False`: a 135M student decoding greedily fell into loops such as "Best (5): Best (5): ..." on
    8% of test rows when it had to reproduce a quote; see docs/results.md).
  - match: which of the item's categories the user's liked items have, then the rating's arithmetic.
- "titles": only what the prompt spells out. The user's mean and their best and worst titles with ratings;
  the item's title, mean and (`quotes`) the first words of its best and worst earlier reviews' summaries;
  for the match, the user's entry sharing most categories with the item, its rating and how many
  categories they share, then the arithmetic. No counts (the 384-trace "counts" student wrote "1 ratings" on
  all 367 music test rows, a third of them right: counting a list is beyond it) and no lists of genres,
  which are the same few words on most answers.

Both styles rate by the bias rule, user average + item average - the split's mean, rounded to a whole
star and kept on the scale: the user+item bias baseline computed from the two averages the prompt states
(so the student can learn to read them, and GRPO can then learn to do better than the rule). With
`shrink` = k each average first gets k ratings at the split's mean added, so that a user with two ratings
moves the guess less than one with forty (`coldstart.shrink`; docs/results.md has the rule's own scores
for each k). How the sum is written is a setting too, because the student copies its form: one
sum or two steps (`stepwise`), the item's mean first (`item_first`: a student copied the first term's whole
stars into the sum), "capped at 5" for a sum above the scale (`say_cap`), and a whole star or a tenth
(`tenths`).

Why terse: the evaluation calls an answer copied when over 30% of its word 6-grams appear in one other answer
(experiments/copying.py), and a model that learns its teacher's fixed phrases inherits them. Prose with a
fixed skeleton ("The user rated N items, X stars on average, below the usual ...") made 96% of 256 traces
copies; on the music validation split "counts" traces without quotes still share their counts, ranges
and genre lists (82% copies; 50% counted only against answers about another user and another item; 61% and
10% with quotes), and "titles" traces, whose runs of six words nearly always hold a title, a quote or the
pair's own numbers, 31% and 0.3% (`python -m experiments.rule_teacher --data data/amazon-music --style
titles` prints them; what remains is answers about the same item, which rightly say the same things about
it).

Every number and title in a trace is a fact of the example (with `coldstart.from_prompt`, of the example as
its token-budgeted prompt shows it: experiments/coldstart.py); only the rating is a guess, and `coldstart`
keeps a trace only when that guess is within `coldstart.tolerance` of the label. Traces are kept short
(~70-140 tokens): GRPO cuts an answer at `sampling.max_new_tokens`, and a model taught longer answers
would never reach its rating (`experiments.recone` drops pairs that do not fit).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

LIKED, DISLIKED = 4.0, 2.0  # ratings at or above / at or below these count as liked / disliked
TITLES = 2  # titles quoted per side (a trace must fit sampling.max_new_tokens: ~100-150 tokens here)
SUMMARY_CHARS = 60  # a review summary is quoted up to this many characters (style "counts")
QUOTE_CHARS = 40  # ... and up to this many in style "titles"
STYLES = ("counts", "titles")
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


def shrunk(avg: float | None, count: int, global_mean: float, shrink: float) -> float:
    """An average with `shrink` extra ratings at the global mean mixed in: (count * avg + shrink * mean) /
    (count + shrink). An average of two ratings says less than one of forty; this pulls the thin ones toward
    the usual rating. A missing average is the global mean (no evidence either way)."""
    if avg is None:
        return global_mean
    if shrink <= 0:
        return float(avg)
    return (count * float(avg) + shrink * global_mean) / (count + shrink)


def whole_star(x: float, scale: Sequence[float]) -> int:
    """x rounded half up (4.5 -> 5, as a reader rounds; Python's round() gives 4) and kept on the scale."""
    return int(min(max(math.floor(x + 0.5), scale[0]), scale[1]))


def sum_rating(x: float, scale: Sequence[float], tenths: bool = False) -> float:
    """The rating the bias rule's sum gives: its whole star (`whole_star`), or with `tenths` the sum itself;
    kept on the scale either way."""
    return min(max(x, scale[0]), scale[1]) if tenths else whole_star(x, scale)


def _about(shown: str, scale: Sequence[float], tenths: bool = False) -> tuple[str, float]:
    """`coldstart.say_cap`: the rating read off the sum as written ("5.5" -> 5 via 6, although the exact sum
    may be 5.46), and what the trace says after the sum: ", about 4", or ", capped at 5" when the sum rounds
    off the scale. A student taught "5.6, about 5" on the few traces whose sum passes the top learned
    "about" as "rounded" and wrote "about 6", an answer off the scale (docs/results.md); a word of its own
    for the clip gives it something to learn, and reading the written number keeps "4.5, about 4" out of
    the traces. With `tenths` (`coldstart.tenths`) the rating is the written sum itself, kept on the scale:
    nothing is said after a sum on the scale, ", capped at 5" after one above it."""
    x = float(shown)
    rating = sum_rating(x, scale, tenths)
    if tenths:
        return (f", capped at {_stars(rating)}" if rating != x else ""), rating
    return (f", capped at {rating}" if math.floor(x + 0.5) != rating else f", about {rating}"), rating


def rule_rating(user_avg: float | None, item_avg: float | None, global_mean: float,
                scale: tuple[float, float] = (1.0, 5.0), n_user: int = 0, n_item: int = 0,
                shrink: float = 0.0) -> int:
    """user average + item average - global mean, rounded to a whole star and clipped to the scale; with
    `shrink` > 0 each average first gets `shrink` ratings at the global mean added (n_user / n_item: how many
    ratings each average is over)."""
    u = shrunk(user_avg, n_user, global_mean, shrink)
    i = shrunk(item_avg, n_item, global_mean, shrink)
    return whole_star(u + i - global_mean, scale)


def _rated(entries: Sequence[dict]) -> str:
    return ", ".join(f'"{_title(e)}" ({_stars(float(e["rating"]))})' for e in entries) or "none"


def _offset_steps(u: float, i: float, global_mean: float, scale: Sequence[float],
                  say_cap: bool = False, tenths: bool = False) -> tuple[str, float]:
    """The bias rule as two one-operation steps on the one-decimal numbers shown, each exact as written:
    "User 4.2 - 4.5 = -0.3. Item 3.9 - 0.3 = 3.6, about 4." A 135M student taught the three-term sum
    "4.2 + 3.9 - 4.5 = 3.6" got it right in about one answer in five (docs/results.md); one operation at a
    time is the usual way to make arithmetic learnable for a small model. Returns the text and its rating."""
    us, its, gs = round(u, 1), round(i, 1), round(global_mean, 1)
    offset = round(us - gs, 1)
    total = round(its + offset, 1)
    rating = whole_star(total, scale)
    named = f", about {rating}"
    if say_cap or tenths:
        named, rating = _about(_stars(total), scale, tenths)
    sign = "-" if offset < 0 else "+"
    return (f"User {_stars(us)} - {_stars(gs)} = {_stars(offset)}. "
            f"Item {_stars(its)} {sign} {_stars(abs(offset))} = {_stars(total)}{named}."), rating


def _closest(history: Sequence[dict], item: dict) -> tuple[dict, int] | None:
    """The user's rated entry sharing most categories with the item (ties: the higher rating, then the earlier
    entry), and how many it shares; None without history. The ratings a user gave to items like this one are
    the most direct evidence of how they will rate it."""
    if not history:
        return None
    wanted = set(_categories(item))
    best = max(history, key=lambda e: (len(wanted & set(_categories(e))), float(e["rating"])))
    return best, len(wanted & set(_categories(best)))


def _counts_sections(history, reviews, item, user_avg, item_avg, quotes, liked, disliked):
    """style "counts": how many ratings and reviews, the range of the item's reviews, the liked genres."""
    liked_categories = Counter(c for e in liked for c in _categories(e))
    mean = _stars(user_avg) if user_avg is not None else "unknown"
    user = (f"{len(history)} ratings, mean {mean}. Liked: {_rated(liked[:TITLES])}. "
            f"Disliked: {_rated(disliked[:TITLES])}.")
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
    return user, about, f"Shared genres: {', '.join(shared[:2]) or 'none'}. "


def _titles_sections(history, reviews, item, user_avg, item_avg, quotes, liked, disliked):
    """style "titles": titles and review summaries quoted, the user's entry closest to the item; no counts and
    no genre lists (the module docstring says why)."""
    user = f"Mean {_stars(user_avg) if user_avg is not None else 'unknown'}."
    if liked:
        user += f" Liked {_rated(liked[:TITLES])}."
    if disliked:
        user += f" Disliked {_rated(disliked[:TITLES])}."
    about = f'"{_title(item)}"'
    if reviews and item_avg is not None:
        about += f", mean {_stars(item_avg)}."
        if quotes:
            best = max(reviews, key=lambda r: float(r["rating"]))
            worst = min(reviews, key=lambda r: float(r["rating"]))
            about += f' "{_summary(best)[:QUOTE_CHARS].rstrip()}" ({_stars(float(best["rating"]))})'
            if float(worst["rating"]) < float(best["rating"]):
                about += f', "{_summary(worst)[:QUOTE_CHARS].rstrip()}" ({_stars(float(worst["rating"]))})'
            about += "."
    else:
        about += ": no earlier reviews."
    match = ""
    if (closest := _closest(history, item)) is not None:
        entry, shared = closest
        match = (f'"{_title(entry)}" ({_stars(float(entry["rating"]))}) is closest to "{_title(item)}": '
                 f"{shared} genres in common. ")
    return user, about, match


def rule_trace(example: dict, global_mean: float, quotes: bool = True, shrink: float = 0.0,
               stepwise: bool = False, style: str = "counts", say_cap: bool = False, tenths: bool = False,
               item_first: bool = False) -> str:
    """The four-step answer for one example (tbr template tags), every statement read off the example;
    `style` chooses what the first three steps state ("counts" or "titles": see the module docstring);
    `quotes` chooses between quoting the summaries of the item's best and worst earlier reviews and not;
    `shrink` is how many ratings at the global mean the match step adds to each average (see `shrunk`);
    `stepwise` writes the rating's arithmetic as two one-operation steps (see `_offset_steps`); `say_cap`
    names a sum that rounds off the scale "capped at" its end rather than "about" it, and rates the sum as
    written (see `_about`); `tenths` rates it to a tenth of a star rather than a whole star (with the same
    cap wording); `item_first` writes the one-sum arithmetic as item mean + user mean - usual rating (the
    sum is the item's mean moved by the user's offset, so it mostly shares the first term's whole stars: a
    student that copied them from the user's mean wrote "5 + 4.4 - 4.5 = 5.9")."""
    if style not in STYLES:
        raise ValueError(f"unknown rule-trace style {style!r}: expected one of {STYLES}")
    history = example.get("user_history") or []
    reviews = example.get("item_history") or []
    item = example.get("item") or {}
    scale = tuple(example.get("rating_scale") or (1.0, 5.0))
    user_avg, item_avg = example.get("user_avg_rating"), example.get("item_avg_rating")

    by_rating = sorted(history, key=lambda e: (-float(e["rating"]), str(e.get("title"))))
    liked = [e for e in by_rating if float(e["rating"]) >= LIKED]
    disliked = [e for e in reversed(by_rating) if float(e["rating"]) <= DISLIKED]
    sections = _counts_sections if style == "counts" else _titles_sections
    user, about, match = sections(history, reviews, item, user_avg, item_avg, quotes, liked, disliked)

    u = shrunk(user_avg, len(history), global_mean, shrink)
    i = shrunk(item_avg, len(reviews), global_mean, shrink)
    if shrink:
        match += f"With {_stars(shrink)} usual {_stars(global_mean)} added: user {_stars(u)}, item {_stars(i)}. "
    if stepwise:
        arithmetic, rating = _offset_steps(u, i, global_mean, scale, say_cap, tenths)
    else:
        rating = rule_rating(user_avg, item_avg, global_mean, scale, len(history), len(reviews), shrink)
        named = f", about {rating}"
        if say_cap or tenths:
            named, rating = _about(_stars(u + i - global_mean), scale, tenths)
        first, second = (i, u) if item_first else (u, i)
        arithmetic = (f"{_stars(first)} + {_stars(second)} - {_stars(global_mean)} = "
                      f"{_stars(u + i - global_mean)}{named}.")
    match += arithmetic
    return (f"<analyze user>\n{user}\n</analyze user>\n<analyze item>\n{about}\n"
            f"</analyze item>\n<match>\n{match}\n</match>\n<rate> {_stars(rating)} </rate>")


def main(argv=None) -> int:
    """The rule's own scores on a split: what a student that copied its teacher perfectly would score, and
    the copy rates of the traces themselves (a student that learns them can do no better)."""
    import argparse

    import numpy as np

    from experiments.baselines import load_splits
    from experiments.copying import copy_rate, subjects
    from experiments.stats import bootstrap_ci, error_statistic
    from prompts import parse_completion

    parser = argparse.ArgumentParser(description="Score the rule teacher's ratings on a prepared split: "
                                     "python -m experiments.rule_teacher --data data/amazon-music --split val")
    parser.add_argument("--data", required=True, help="a prepared data folder (train/val/test.jsonl)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--shrink", type=float, nargs="+", default=[0.0],
                        help="one or more values of coldstart.shrink")
    parser.add_argument("--stepwise", action="store_true", help="coldstart.stepwise")
    parser.add_argument("--style", choices=STYLES, default="counts", help="coldstart.style")
    parser.add_argument("--no-quotes", dest="quotes", action="store_false", help="coldstart.quotes=false")
    parser.add_argument("--say-cap", action="store_true", help="coldstart.say_cap=true")
    parser.add_argument("--tenths", action="store_true", help="coldstart.tenths=true")
    parser.add_argument("--item-first", action="store_true", help="coldstart.item_first=true")
    parser.add_argument("--prompt-config", metavar="YAML",
                        help="coldstart.from_prompt=true: write each trace from what its prompt shows, prompts "
                             "built with this experiment config's task settings and tokenizer")
    parser.add_argument("--paired", action="store_true",
                        help="also the paired bootstrap of the rule against the best baseline of each metric on "
                             "these rows, as experiments.evaluate reports a model: could a student that copied "
                             "its teacher perfectly be told apart from the baselines?")
    args = parser.parse_args(argv)
    view = lambda ex: ex  # noqa: E731
    if args.prompt_config:
        from experiments.coldstart import ReconeConfig
        from experiments.config import load_config
        from experiments.task import RecTask
        from grpo.models import load_tokenizer

        cfg = load_config(ReconeConfig, args.prompt_config, [f"task.data_dir={args.data}"])
        view = RecTask(cfg.task, load_tokenizer(cfg.model.name_or_path)).shown
    splits = load_splits(args.data)
    global_mean = float(np.mean([float(ex["rating"]) for ex in splits["train"]]))
    rows = splits[args.split]
    labels = np.array([float(ex["rating"]) for ex in rows])  # (n,)
    about = [subjects(ex) for ex in rows]
    print(f"{args.data} {args.split}: {len(rows)} rows, training mean {global_mean:.4f}")
    best = {}  # metric -> (baseline name, its signed errors on these rows)
    if args.paired:
        from experiments.evaluate import baseline_errors, diff_text, paired_metrics

        base = baseline_errors(args.data, rows)
        for stat in ("mae", "rmse"):
            name = min(base, key=lambda n: error_statistic(base[n], stat))
            best[stat] = name, base[name]
    for shrink in args.shrink:
        traces = [rule_trace(view(ex), global_mean, quotes=args.quotes, shrink=shrink, stepwise=args.stepwise,
                             style=args.style, say_cap=args.say_cap, tenths=args.tenths,
                             item_first=args.item_first) for ex in rows]
        rated = np.array([parse_completion(t, template="tbr").rating for t in traces])  # (n,)
        mae, rmse = (bootstrap_ci(rated - labels, stat) for stat in ("mae", "rmse"))
        hist = "/".join(str(int((np.floor(rated + 0.5) == r).sum())) for r in range(1, 6))  # tenths: rounded
        copies = copy_rate(traces)["copy_rate"], copy_rate(traces, related=about)["copy_rate"]
        name = f"shrink {shrink:g}{' stepwise' if args.stepwise else ''}"
        print(f"{name}: MAE {mae[0]:.4f} [{mae[1]:.4f}, {mae[2]:.4f}]"
              f"  RMSE {rmse[0]:.4f} [{rmse[1]:.4f}, {rmse[2]:.4f}]  rated 1/2/3/4/5: {hist}"
              f"  copy {copies[0]:.3f} copy_u {copies[1]:.3f}")
        for stat, (base_name, base_errors) in best.items():
            print(f"  vs {base_name} (best {stat.upper()} baseline): "
                  f"{diff_text(paired_metrics(rated - labels, base_errors), stat)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
