"""How closely a model taught by the rule teacher (`coldstart.teacher: rules`) follows its teacher.

    python -m experiments.rule_fidelity music.json
    python -m experiments.rule_fidelity music.json --config runs/recone_all/sft/config.yaml

Reads an `experiments.evaluate --out` file, writes the rule trace (experiments/rule_teacher.py) for each of
its rows with the run's coldstart settings (from the run's config.yaml, found from the evaluated
checkpoint, or --config), and reports over the answers that parsed the share that:
- give the rule's rating;
- state the user's rating count and mean, the item's review count and mean, and (style "titles") the
  summary of the item's best review and the user's entry closest to the item, as the trace does ("not
  stated" for a fact the run's traces never state);
- write a rating arithmetic that is exact as written (every shown operation computed to one decimal);
- rate what their own arithmetic gives (its whole star; the total itself with coldstart.tenths);
and the share of the strings the answers quote ("...") that begin a title or review summary their prompt shows
(the token budget drops the oldest entries: a title the prompt no longer shows counts as made up).
Where the model departs from its teacher tells what to change in the traces: a student that copies the
numbers but cannot subtract needs simpler arithmetic, not more data about the user.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from experiments.coldstart import ReconeConfig, rule_teacher
from experiments.config import load_config
from experiments.evaluate import find_run_config
from experiments.rule_teacher import sum_rating
from experiments.task import RecTask
from experiments.teacher import example_id
from grpo.models import load_tokenizer
from prompts import parse_completion

NUMBER = r"-?\d+(?:\.\d+)?"
USER_COUNT = re.compile(r"(\d+) ratings, mean")  # style "counts" only
ITEM_COUNT = re.compile(r"(\d+) earlier reviews, mean")
USER_MEAN = re.compile(rf"(?:ratings, mean|^Mean) ({NUMBER})", re.MULTILINE)  # "counts" / "titles"
ITEM_MEAN = re.compile(rf"(?:earlier reviews, mean|\", mean) ({NUMBER})")
ITEM_QUOTE = re.compile(rf'", mean {NUMBER}\. "(.+?)" \(\d')  # style "titles" with quotes only
CLOSEST = re.compile(r'^"(.+?)" \(\d(?:\.\d)?\) is closest', re.MULTILINE)  # style "titles" only
FACTS = (("user_count", USER_COUNT), ("user_mean", USER_MEAN), ("item_count", ITEM_COUNT),
         ("item_mean", ITEM_MEAN), ("item_best_quote", ITEM_QUOTE), ("closest_entry", CLOSEST))

# what follows the sum: ", about 4", ", capped at 5" (coldstart.say_cap) or nothing (coldstart.tenths: the sum is
# the rating)
RATED = rf"(?:, (?:about|capped at) ({NUMBER})|\.)"
SUM = re.compile(rf"({NUMBER}) \+ ({NUMBER}) - ({NUMBER}) = ({NUMBER}){RATED}")
STEPS = re.compile(rf"User ({NUMBER}) - ({NUMBER}) = ({NUMBER})\. Item ({NUMBER}) ([+-]) ({NUMBER}) = ({NUMBER}){RATED}")
QUOTED = re.compile(r'"([^"\n]{2,})"')


def example_strings(example: dict) -> set[str]:
    """The titles and review summaries of an example (pass it as its prompt shows it, `RecTask.shown`),
    lower-cased: what an answer may quote."""
    entries = [*(example.get("user_history") or []), example.get("item") or {}, *(example.get("item_history") or [])]
    return {" ".join(str(e.get(key) or "").split()).lower() for e in entries for key in ("title", "summary")} - {""}


def grounded(answer: str, strings: set[str]) -> tuple[int, int]:
    """(quoted strings in the answer that begin a title or summary of its example, quoted strings): a quote
    that appears nowhere in the prompt was made up, however specific it looks."""
    quotes = [" ".join(q.split()).lower() for q in QUOTED.findall(answer)]
    return sum(any(s.startswith(q) for s in strings) for q in quotes), len(quotes)


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def arithmetic(text: str) -> tuple[bool, float, float] | None:
    """(every operation exact to one decimal, the total written, the rating written after "about" or "capped
    at", else the total itself), or None when the answer has neither form of the rule's arithmetic."""
    if m := STEPS.search(text):
        u, g, offset, i, step, total = (float(m[k]) for k in (1, 2, 3, 4, 6, 7))
        sign = m[5]
        exact = round(u - g, 1) == offset and abs(step) == abs(offset) and (sign == "-") == (offset < 0) \
            and round(i + offset, 1) == total
        return exact, total, float(m[8]) if m[8] else total
    if m := SUM.search(text):
        u, i, g, total = (float(m[k]) for k in range(1, 5))
        return round(u + i - g, 1) == total, total, float(m[5]) if m[5] else total
    return None


def fidelity(rows: list[dict], traces: dict[str, str], template: str,
             strings: dict[str, set[str]] | None = None, tenths: bool = False) -> dict:
    """Shares over the parsed answers in `rows` (evaluate's per-row records) of each way to follow `traces`
    (example id -> the rule trace for that row); a fact the traces never state (the counts, in style
    "titles") is None. With `strings` (example id -> `example_strings`), also the share of all quoted
    strings in the answers that the prompt shows (`quotes_grounded`; None when no answer quotes anything).
    `tenths` (coldstart.tenths): the arithmetic's total, kept on the scale, is the rating; else its whole star."""
    counts = dict.fromkeys(["rule_rating", *(name for name, _ in FACTS),
                            "arithmetic_written", "arithmetic_exact", "rates_own_arithmetic"], 0)
    stated = dict.fromkeys([name for name, _ in FACTS], False)
    parsed = [r for r in rows if r["format_ok"] and r["id"] in traces]
    found = quoted = 0
    for r in parsed:
        if strings is not None:
            hits, total = grounded(r["completion"], strings[r["id"]])
            found, quoted = found + hits, quoted + total
        trace, answer = traces[r["id"]], r["completion"]
        counts["rule_rating"] += parse_completion(trace, template=template).rating == r["rating"]
        for name, pattern in FACTS:
            if want := pattern.search(trace):
                stated[name] = True
                got = pattern.search(answer)
                counts[name] += bool(got and _same(want[1], got[1]))
        if (written := arithmetic(answer)) is not None:
            exact, total, about = written
            counts["arithmetic_written"] += 1
            counts["arithmetic_exact"] += exact
            counts["rates_own_arithmetic"] += about == r["rating"] == sum_rating(total, (1, 5), tenths)
    n = len(parsed)
    out = {"n_rows": len(rows), "n_parsed": n,
           **{k: None if not stated.get(k, True) else v / n if n else 0.0 for k, v in counts.items()}}
    if strings is not None:
        out["quotes_grounded"] = found / quoted if quoted else None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_file", help="an `experiments.evaluate --out` JSON file")
    parser.add_argument("--config", help="the run's config.yaml (default: found from the evaluated checkpoint)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. coldstart.stepwise=true")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.eval_file).read_text(encoding="utf-8"))
    results = {}
    for model, rows in report["predictions"].items():
        config = args.config or find_run_config(model)
        if config is None:
            print(f"{model}: not a run's checkpoint; name its config.yaml with --config", file=sys.stderr)
            return 2
        cfg = load_config(ReconeConfig, str(config), [*args.overrides, f"task.data_dir={report['data']}"])
        if cfg.coldstart.teacher != "rules":
            print(f"{model}: its run was taught by coldstart.teacher={cfg.coldstart.teacher}, not by rules",
                  file=sys.stderr)
        teacher = rule_teacher(cfg)
        task = RecTask(cfg.task, tokenizer=load_tokenizer(cfg.model.name_or_path))  # to cut examples as prompts do
        examples = task.examples(report["split"])
        traces = {example_id(ex): teacher(ex) for ex in examples}
        strings = {example_id(ex): example_strings(task.shown(ex)) for ex in examples}
        results[model] = fidelity(rows, traces, cfg.task.template, strings, cfg.coldstart.tenths)
        print(f"{model} ({report['data']}, {report['split']}):")
        shown = {k: "not stated" if v is None else f"{v:.3f}" if isinstance(v, float) else v
                 for k, v in results[model].items()}
        print("  " + "\n  ".join(f"{k}: {v}" for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
