"""One results table of everything finished so far, per dataset, with the paper's published figures beside ours.

    python -m experiments.report                       # scans runs/ and data/*/baselines.json -> runs/report/
    python -m experiments.report --runs runs --data data/amazon-music --evals untrained.json --out runs/report

Collects
- every finished run folder under --runs (config.yaml + eval.json): RecZero, RecOne (the GRPO stage of an
  `experiments.recone` pipeline) and its SFT stage alone ("RecOne SFT only"), ablation variants
  (`experiments.ablate_reward`, variant.json), with their final validation evaluation;
- the untrained model: the step-0 evaluation of runs that start from a base model (once per model, prompt
  settings and number of rows), and `experiments.evaluate` results for models that are no run's checkpoint;
- `experiments.evaluate --out FILE` results (found under --runs, or given with --evals), and the baselines
  they scored on the same rows;
- baselines.json written by `experiments.baselines` in each data folder (--data, the runs' task.data_dir and
  data/*).
Each row says which split and how many rows it was measured on: a run's own evaluation uses the first
`run.eval_examples` validation rows, baselines.json the whole test split. Compare rows of the same split and n.

Writes results.md (a section per dataset) and results.csv (one line per row, full precision, with the folder or
file each row came from and the command that produced it), each through a temporary file beside it renamed when
complete; an --out whose results file is one of the --evals inputs is refused (exit 2).
"""
from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
from pathlib import Path

from experiments.evaluate import find_run_config
from experiments.runs import Column, Run, find_runs, format_seconds, get_key, load_run, markdown_table, read_json
from recdata.readers import atomic_write, same_file

OUTPUT_FILES = ("results.md", "results.csv")

# Published MAE (docs/paper.md "Results": Kong et al., NeurIPS 2025, arXiv 2510.23077; the paper's main results
# table and text). Our notes give MAE only (RMSE only as relative gains), so there is no published RMSE column.
# Printed: Reason4Rec, the strongest baseline; RecZero on Music, early-stopped after 480 samples; an SFT-only
# model on 20,000 samples (Music, by the notes' context). RecOne's are derived from its printed MAE reduction
# against Reason4Rec (Music 29.9%, Book 16.8%, Yelp 7.5%), not printed themselves.
REASON4REC_MAE = {"music": 0.5442, "book": 0.6029, "yelp": 0.7028}
RECONE_MAE_REDUCTION = {"music": 0.299, "book": 0.168, "yelp": 0.075}
PAPER_MAE: dict[tuple[str, str], tuple[float, str]] = {
    ("music", "RecZero"): (0.5419, "printed; early-stopped after 480 samples"),
    ("music", "RecOne SFT only"): (0.6472, "printed; SFT only on 20,000 samples"),
    **{(d, "RecOne"): (round(REASON4REC_MAE[d] * (1 - RECONE_MAE_REDUCTION[d]), 4),
                       f"derived: Reason4Rec's MAE less {RECONE_MAE_REDUCTION[d]:.1%}") for d in REASON4REC_MAE},
}
KIND_ORDER = ("published", "baseline", "baseline (same rows)", "untrained", "RecOne SFT only", "RecZero", "RecOne",
              "ablation")
# JSON files in a run tree that are not `experiments.evaluate` results.
RUN_JSON = {"eval.json", "run.json", "variant.json", "stages.json", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "baselines.json"}


def family(dataset: str) -> str | None:
    """The paper's dataset a folder name stands for (music, book, yelp), if any."""
    name = dataset.lower()
    return next((f for f in ("music", "book", "yelp") if f in name), None)


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------
def classify(run: Run) -> str:
    if (run.path / "variant.json").exists():
        return "ablation"
    is_sft = any("sft/loss" in r for r in run.metrics)
    if is_sft:
        return "RecOne SFT only"
    if (run.path.parent / "stages.json").exists() or (run.path.parent / "sft" / "config.yaml").exists():
        return "RecOne"
    start = str(get_key(run.config, "model.name_or_path") or "")
    if "checkpoints" in Path(start).parts and Path(start).parent.parent.name == "sft":
        return "RecOne"
    return "RecZero"


def _name(run: Run, root: Path) -> str:
    try:
        return str(run.path.relative_to(root))
    except ValueError:
        return str(run.path)


def _train_time(run: Run, kind: str) -> tuple[float | None, str]:
    seconds, source = run.wall_time()
    sft = run.path.parent / "sft"
    if kind == "RecOne" and seconds is not None and (sft / "config.yaml").exists():
        sft_seconds, sft_source = load_run(sft).wall_time()
        if sft_seconds is not None:
            return seconds + sft_seconds, f"SFT + GRPO ({source}; cold-start traces not timed)"
    return seconds, source


INTERVAL_KEYS = ("mae_lo", "mae_hi", "rmse_lo", "rmse_hi")


def _interval_text(row: dict, stat: str) -> str | None:
    lo, hi = row.get(f"{stat}_lo"), row.get(f"{stat}_hi")
    return f"[{lo:.4f}, {hi:.4f}]" if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else None


def _verdicts(vs_baselines: dict | None, stat: str) -> str | None:
    """'global_mean: better (-0.1234 [-0.2000, -0.0500]); mf: not distinguishable (...)' from an evaluate
    JSON's vs_baselines; None when the file predates them."""
    if not isinstance(vs_baselines, dict) or not vs_baselines:
        return None
    parts = []
    for name, d in vs_baselines.items():
        try:
            parts.append(f"{name}: {d[f'{stat}_verdict']} ({d[f'{stat}_diff']:+.4f} "
                         f"[{d[f'{stat}_diff_lo']:+.4f}, {d[f'{stat}_diff_hi']:+.4f}])")
        except (KeyError, TypeError, ValueError):
            continue
    return "; ".join(parts) or None


def _metric_row(metrics: dict) -> dict:
    """The table's numbers of one evaluation; the intervals, fallback-scored figures, copy rate and verdicts
    only where an `experiments.evaluate` JSON has them (older files and run evaluations leave them empty)."""
    row = {"mae": metrics.get("mae"), "rmse": metrics.get("rmse"), "format_fail": metrics.get("format_fail"),
           "len_mean": metrics.get("len_mean"), "n": metrics.get("n"),
           "mae_fallback": metrics.get("mae_fallback"), "rmse_fallback": metrics.get("rmse_fallback"),
           "copy_rate": metrics.get("copy_rate"), "copy_rate_unrelated": metrics.get("copy_rate_unrelated"),
           **{k: metrics.get(k) for k in INTERVAL_KEYS},
           "vs_baselines_mae": _verdicts(metrics.get("vs_baselines"), "mae"),
           "vs_baselines_rmse": _verdicts(metrics.get("vs_baselines"), "rmse")}
    row["mae_ci"], row["rmse_ci"] = _interval_text(row, "mae"), _interval_text(row, "rmse")
    if metrics.get("format_fail"):  # only matters where something failed; older files lack mae_fallback
        row["failures_scored_as"] = "farthest" if "mae_fallback" in metrics else "fallback (older file)"
    return row


def run_rows(root: Path) -> tuple[list[dict], list[str]]:
    rows, notes, untrained = [], [], {}
    for path in find_runs(root):
        run = load_run(path)
        if not run.finished:
            notes.append(f"not finished, left out: {path}")
            continue
        kind = classify(run)
        name = _name(run, root)
        seconds, source = _train_time(run, kind)
        final = run.final_metrics()
        if final.get("mae") is None:
            notes.append(f"no rating evaluation in {path / 'eval.json'}, left out")
        else:
            rows.append({"dataset": run.dataset, "kind": kind, "name": name, "split": "val", "steps": final.get("step"),
                         **_metric_row(final), "train_s": seconds, "train_time_source": source,
                         "source": str(path), "command": run.command()})
        start = run.start_metrics()
        model = str(get_key(run.config, "model.name_or_path") or "")
        if start.get("mae") is not None and kind in ("RecZero", "ablation") and "checkpoints" not in Path(model).parts:
            label = model + (" (random init)" if get_key(run.config, "model.random_init") else "")
            key = (run.dataset, label, *(str(get_key(run.config, k)) for k in (
                "task.template", "task.one_shot", "task.prefill", "sampling.max_new_tokens")), start.get("n"))
            if key not in untrained:
                template = get_key(run.config, "task.template")
                untrained[key] = {"dataset": run.dataset, "kind": "untrained",
                                  "name": f"{label}, template {template} (step 0 of {name})", "split": "val",
                                  "steps": 0, **_metric_row(start), "source": str(path), "command": run.command()}
    return rows + list(untrained.values()), notes


# ----------------------------------------------------------------------------------------------------------
# experiments.evaluate results and baselines.json
# ----------------------------------------------------------------------------------------------------------
def is_evaluation(record: dict) -> bool:
    return isinstance(record.get("models"), dict) and "split" in record and "data" in record


def find_evaluations(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.json")
                  if p.name not in RUN_JSON and "checkpoints" not in p.parts and is_evaluation(read_json(p)))


def evaluation_rows(path: Path, root: Path) -> list[dict]:
    record = read_json(path)
    dataset = Path(record["data"]).name
    common = {"dataset": dataset, "split": record["split"], "source": str(path),
              "command": record.get("command", "")}
    rows = []
    for model, metrics in record["models"].items():
        config = find_run_config(model)
        if config is None:
            kind, name, seconds, source = "untrained", f"{model} (experiments.evaluate)", None, ""
        else:
            run = load_run(config.parent)
            kind = classify(run)
            name = f"{_name(run, root)}: {Path(model).name} (experiments.evaluate)"
            seconds, source = _train_time(run, kind)
        rows.append({**common, "kind": kind, "name": name, **_metric_row(metrics),
                     "n": metrics.get("n", record.get("n")), "train_s": seconds, "train_time_source": source})
    for name, metrics in (record.get("baselines_same_rows") or {}).items():
        row = {**common, "kind": "baseline (same rows)", "name": name, "mae": metrics.get("mae"),
               "rmse": metrics.get("rmse"), "n": record.get("n"), **{k: metrics.get(k) for k in INTERVAL_KEYS}}
        row["mae_ci"], row["rmse_ci"] = _interval_text(row, "mae"), _interval_text(row, "rmse")
        rows.append(row)
    return rows


def baseline_rows(data_dir: Path) -> list[dict]:
    results = read_json(data_dir / "baselines.json")
    rows = []
    for name, r in results.items():
        if not isinstance(r, dict) or "mae" not in r:
            continue
        rows.append({"dataset": data_dir.name, "kind": "baseline", "name": name, "split": "test", "n": r.get("n_test"),
                     "mae": r["mae"], "rmse": r.get("rmse"), "source": str(data_dir / "baselines.json"),
                     "command": f"python -m experiments.baselines --data {shlex.quote(str(data_dir))}"
                                "  (reconstructed)"})
    return rows


def published_rows(datasets: list[str]) -> list[dict]:
    rows = []
    for dataset in datasets:
        f = family(dataset)
        if f in REASON4REC_MAE:
            rows.append({"dataset": dataset, "kind": "published", "name": "Reason4Rec (paper's strongest baseline)",
                         "split": "test (paper's)", "paper_mae": REASON4REC_MAE[f], "paper_note": "printed",
                         "source": "docs/paper.md, Results"})
    return rows


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------
COLUMNS = [
    Column("kind", "kind"), Column("name", "name"), Column("split", "split"), Column("n", "n"),
    Column("steps", "steps"), Column("mae", "MAE", ".4f"), Column("mae_ci", "MAE 95% CI"),
    Column("rmse", "RMSE", ".4f"), Column("rmse_ci", "RMSE 95% CI"), Column("mae_fallback", "MAE (fallback)", ".4f"),
    Column("format_fail", "format failures", ".3f"), Column("failures_scored_as", "failures scored as"),
    Column("copy_rate", "copy rate", ".3f"), Column("copy_rate_unrelated", "copy rate (unrelated)", ".3f"),
    Column("vs_baselines_mae", "MAE vs baselines (paired)"),
    Column("len_mean", "tokens / answer", ".1f"), Column("train_time", "training time"),
    Column("paper_mae", "paper MAE", ".4f"), Column("command", "command"),
]
CSV_KEYS = ["dataset", "kind", "name", "split", "n", "steps", "mae", "mae_lo", "mae_hi", "rmse", "rmse_lo", "rmse_hi",
            "mae_fallback", "rmse_fallback", "format_fail", "failures_scored_as", "copy_rate", "copy_rate_unrelated",
            "vs_baselines_mae", "vs_baselines_rmse", "len_mean", "train_s", "train_time_source", "paper_mae",
            "paper_note", "source", "command"]


def collect(runs_root: Path, data_dirs: list[Path], evals: list[Path]) -> tuple[list[dict], list[str]]:
    rows, notes = run_rows(runs_root) if runs_root.exists() else ([], [f"no runs folder {runs_root}"])
    eval_files = list(dict.fromkeys([*evals, *(find_evaluations(runs_root) if runs_root.exists() else [])]))
    for path in eval_files:
        rows += evaluation_rows(path, runs_root)
    dirs = list(data_dirs)
    for path in find_runs(runs_root) if runs_root.exists() else []:
        data = get_key(load_run(path).config, "task.data_dir")
        if data:
            dirs.append(Path(data))
    dirs += sorted(p.parent for p in Path("data").glob("*/baselines.json")) if not data_dirs else []
    seen = set()
    for d in dirs:
        if (d / "baselines.json").exists() and d.resolve() not in seen:
            seen.add(d.resolve())
            rows += baseline_rows(d)
    for row in rows:
        paper = PAPER_MAE.get((family(row["dataset"]) or "", row["kind"]))
        if paper:
            row["paper_mae"], row["paper_note"] = paper
        if row.get("train_s") is not None:  # ">=": only the logged step and evaluation times were summed
            summed = "sum of logged" in row.get("train_time_source", "")
            row["train_time"] = (">= " if summed else "") + format_seconds(row["train_s"])
    rows += published_rows(sorted({r["dataset"] for r in rows}))
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    rows.sort(key=lambda r: (r["dataset"], order.get(r["kind"], len(order)), r["name"]))
    return rows, notes


def render(rows: list[dict], notes: list[str], command: str) -> str:
    lines = ["# Results", "", f"Written by `{command}`.", "",
             "MAE / RMSE of the predicted rating. A failed answer (format failure) is scored as the rating farthest "
             "from the label, so failing never looks better than answering (evaluations written before this rule "
             "scored it as the user's average rating: `failures scored as` says which rule a row used, `MAE (fallback)` "
             "is the fallback-scored figure where a file has it). "
             "`MAE 95% CI` / `RMSE 95% CI`: percentile-bootstrap intervals over rows; `MAE vs baselines (paired)`: "
             "model - baseline MAE on the same rows with its paired-bootstrap interval, better / worse when the "
             "interval excludes 0 (RMSE in results.csv); `copy rate`: answers sharing > 30% of their word 6-grams "
             "with another answer or the prompt's demonstration; these come from `experiments.evaluate` files and "
             "are empty elsewhere. `split` / `n`: what a row was measured on; a run's own evaluation is its last one, on the "
             "first n validation rows, baselines.json covers the whole test split, `experiments.evaluate` rows say "
             "theirs. Only rows of the same split and n are comparable. `paper MAE`: the figure the paper publishes for that "
             "kind of model on that dataset (Qwen2.5-7B on the authors' splits, so a reference, not a like-for-like "
             "comparison); see results.csv's paper_note for printed vs derived. `training time`: wall time from "
             "run.json where recorded, else (marked >=) the sum of the logged step and evaluation times "
             "(results.csv's train_time_source).", ""]
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [f"## {dataset}", "", markdown_table([r for r in rows if r["dataset"] == dataset], COLUMNS), ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write_outputs(out: Path, markdown: str, rows: list[dict]) -> None:
    """results.md and results.csv (raw values at full precision, empty for missing), each written atomically."""
    with atomic_write(out / "results.md") as f:
        f.write(markdown)
    with atomic_write(out / "results.csv") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_KEYS)
        for row in rows:
            writer.writerow(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v
                             for v in (row.get(k) for k in CSV_KEYS)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="the folder to scan for run folders and evaluation JSONs")
    parser.add_argument("--data", action="append", default=[],
                        help="a data folder with baselines.json (repeatable; default: the runs' data and data/*)")
    parser.add_argument("--evals", action="append", default=[],
                        help="an `experiments.evaluate --out` file (repeatable)")
    parser.add_argument("--out", default=None, help="default: <runs>/report")
    args = parser.parse_args(argv)
    runs_root = Path(args.runs)
    out = Path(args.out) if args.out else runs_root / "report"
    clash = next(((out / name, p) for name in OUTPUT_FILES for p in args.evals if same_file(out / name, p)), None)
    if clash is not None:
        print(f"error: writing {clash[0]} would overwrite the input {clash[1]}: choose another --out",
              file=sys.stderr)
        return 2
    missing = [p for p in args.evals if not is_evaluation(read_json(Path(p)))]
    if missing:
        print(f"not an experiments.evaluate result: {', '.join(missing)}", file=sys.stderr)
        return 2
    command = "python -m experiments.report " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows, notes = collect(runs_root, [Path(d) for d in args.data], [Path(p) for p in args.evals])
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, render(rows, notes, command), rows)
    for note in notes:
        print(note)
    print(f"{len(rows)} rows -> {out / 'results.md'}, {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
