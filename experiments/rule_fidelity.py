"""How closely a model taught by the rule teacher (`coldstart.teacher: rules`) follows its teacher.

    python -m experiments.rule_fidelity music.json
    python -m experiments.rule_fidelity music.json --config runs/recone_all/sft/config.yaml

Reads an `experiments.evaluate --out` file, writes the rule trace (experiments/rule_teacher.py) for each of
its rows with the run's coldstart settings (from the run's config.yaml, found from the evaluated
checkpoint, or --config), and reports over the answers that parsed the share that:
- give the rule's rating;
- state the user's rating count and mean, the item's review count and mean, and (style "titles") the user's
  entry closest to the item, as the trace does ("not stated" for a fact the run's traces never state);
- write a rating arithmetic that is exact as written (every shown operation computed to one decimal);
- rate what their own arithmetic rounds to.
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
from experiments.rule_teacher import whole_star
from experiments.task import RecTask
from experiments.teacher import example_id
from prompts import parse_completion

NUMBER = r"-?\d+(?:\.\d+)?"
USER_COUNT = re.compile(r"(\d+) ratings, mean")  # style "counts" only
ITEM_COUNT = re.compile(r"(\d+) earlier reviews, mean")
USER_MEAN = re.compile(rf"(?:ratings, mean|^Mean) ({NUMBER})", re.MULTILINE)  # "counts" / "titles"
ITEM_MEAN = re.compile(rf"(?:earlier reviews, mean|\", mean) ({NUMBER})")
CLOSEST = re.compile(r'^"(.+?)" \(\d(?:\.\d)?\) is closest', re.MULTILINE)  # style "titles" only
FACTS = (("user_count", USER_COUNT), ("user_mean", USER_MEAN), ("item_count", ITEM_COUNT),
         ("item_mean", ITEM_MEAN), ("closest_entry", CLOSEST))


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b
SUM = re.compile(rf"({NUMBER}) \+ ({NUMBER}) - ({NUMBER}) = ({NUMBER}), about (\d)")
STEPS = re.compile(rf"User ({NUMBER}) - ({NUMBER}) = ({NUMBER})\. Item ({NUMBER}) ([+-]) ({NUMBER}) = ({NUMBER}), "
                   rf"about (\d)")


def arithmetic(text: str) -> tuple[bool, float, int] | None:
    """(every operation exact to one decimal, the total written, the rating written after "about"), or None
    when the answer has neither form of the rule's arithmetic."""
    if m := STEPS.search(text):
        u, g, offset, i, step, total = (float(m[k]) for k in (1, 2, 3, 4, 6, 7))
        sign = m[5]
        exact = round(u - g, 1) == offset and abs(step) == abs(offset) and (sign == "-") == (offset < 0) \
            and round(i + offset, 1) == total
        return exact, total, int(m[8])
    if m := SUM.search(text):
        u, i, g, total = (float(m[k]) for k in range(1, 5))
        return round(u + i - g, 1) == total, total, int(m[5])
    return None


def fidelity(rows: list[dict], traces: dict[str, str], template: str) -> dict:
    """Shares over the parsed answers in `rows` (evaluate's per-row records) of each way to follow `traces`
    (example id -> the rule trace for that row); a fact the traces never state (the counts, in style
    "titles") is None."""
    counts = dict.fromkeys(["rule_rating", *(name for name, _ in FACTS),
                            "arithmetic_written", "arithmetic_exact", "rates_own_arithmetic"], 0)
    stated = dict.fromkeys([name for name, _ in FACTS], False)
    parsed = [r for r in rows if r["format_ok"] and r["id"] in traces]
    for r in parsed:
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
            counts["rates_own_arithmetic"] += about == r["rating"] == whole_star(total, (1, 5))
    n = len(parsed)
    return {"n_rows": len(rows), "n_parsed": n,
            **{k: None if not stated.get(k, True) else v / n if n else 0.0 for k, v in counts.items()}}


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
        traces = {example_id(ex): teacher(ex) for ex in RecTask(cfg.task, tokenizer=None).examples(report["split"])}
        results[model] = fidelity(rows, traces, cfg.task.template)
        print(f"{model} ({report['data']}, {report['split']}):")
        shown = {k: "not stated" if v is None else f"{v:.3f}" if isinstance(v, float) else v
                 for k, v in results[model].items()}
        print("  " + "\n  ".join(f"{k}: {v}" for k, v in shown.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
