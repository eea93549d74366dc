"""Evaluate a model on a prepared split, next to the classic baselines on the same rows.

    python -m experiments.evaluate --model runs/reczero/checkpoints/step_16 --data data/amazon-music
    python -m experiments.evaluate --model default --data data/amazon-music --limit 64 --out untrained.json

Greedy decoding (docs/paper.md, "Evaluation"), batched, with a progress bar, on the whole split
by default (--limit N: the first N rows only, for a quick look). Reports:
- MAE and RMSE with 95% percentile-bootstrap intervals over rows (experiments.stats: 2000 resamples, seed 0).
  A format failure is scored as the rating farthest from the label (label 4 on 1-5 -> 1, label 2 -> 5,
  label 3 -> 1: distance 2 either way), so failing never makes a model look better; the same figures with a
  failure scored as the fallback (task.fallback, by default the user's average rating) stay beside them as
  mae_fallback / rmse_fallback ("MAE fb" in the table);
- on the test split, every baseline on the same rows, and per model the paired bootstrap of the difference
  model - baseline (same resampled rows for both) for MAE and RMSE, with its interval and a verdict: better
  (interval below 0), worse (above 0), not distinguishable;
- the format-failure rate, the histogram of parsed ratings and their correlation with the labels (a model
  that collapsed to "always 5" shows at a glance), mean completion length and time;
- the copy rate (experiments.copying): the share of answers whose reasoning shares more than 30% of its word
  6-grams with another answer of the same evaluation or with the prompt's one-shot demonstration; and beside
  it ("copy_u") the same share counted only against answers about another user and another item.

The prompt settings (template, one-shot, prefill, token budget) are read from the run's config.yaml when
the model is a checkpoint of a run, else from --config (default: experiments/configs/reczero.yaml), so a
model is evaluated with the prompts it was trained on.

Before any model is loaded, the split is checked: a missing or empty split, or a row without a `rating`
label, is a one-line error (exit 2; unlabelled examples go to experiments.predict), and so is an --out that
names one of the data folder's files. --out is written to a temporary file beside it and renamed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.baselines import fit_baselines, load_splits, predict_examples, target_pairs
from experiments.config import ExperimentConfig, load_experiment
from experiments.copying import THRESHOLD as COPY_THRESHOLD
from experiments.copying import copy_rate, subjects
from experiments.stats import LEVEL, RESAMPLES, SEED, bootstrap_ci, paired_bootstrap
from experiments.task import RecTask, rating_metrics, scored_predictions
from grpo.config import apply_overrides, build_config, read_config_values
from grpo.models import load_tokenizer
from grpo.runlog import _clean as json_safe
from grpo.policy import load_policy
from grpo.rollout import greedy_completions
from recdata.readers import atomic_write, same_file

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "reczero.yaml"


def find_run_config(model: str) -> Path | None:
    """runs/<name>/checkpoints/step_N -> runs/<name>/config.yaml, if the model is such a checkpoint."""
    path = Path(model)
    for parent in [path, *path.parents][:3]:
        if (parent / "config.yaml").exists():
            return parent / "config.yaml"
    return None


def resolve_config(model: str, config: str | None, overrides: list[str]) -> tuple[ExperimentConfig, str]:
    source = config or find_run_config(model) or DEFAULT_CONFIG
    if Path(str(source)).name == "config.yaml":
        # A run folder's saved config; a pipeline's (RecOne: coldstart, sft, teacher) carries sections that
        # say how the run was made, not how to prompt it: keep the ones an experiment has.
        known = {f.name for f in dataclasses.fields(ExperimentConfig)}
        values = {k: v for k, v in read_config_values(source).items() if k in known}
        cfg = build_config(ExperimentConfig, apply_overrides(values, overrides))
    else:
        cfg = load_experiment(source, overrides)
    cfg.model.name_or_path = model
    cfg.model.random_init = {}
    if not cfg.model.tokenizer or find_run_config(model):
        cfg.model.tokenizer = model if find_run_config(model) or model != "default" else ""
    return cfg, str(source)


def interval_metrics(errors) -> dict[str, float]:
    """MAE and RMSE of signed per-row errors with their bootstrap intervals: mae, mae_lo, mae_hi, rmse, ..."""
    out = {}
    for stat in ("mae", "rmse"):
        value, lo, hi = bootstrap_ci(errors, stat, resamples=RESAMPLES, seed=SEED, level=LEVEL)
        out.update({stat: value, f"{stat}_lo": lo, f"{stat}_hi": hi})
    return out


def paired_metrics(model_errors, baseline_errors) -> dict:
    """The paired bootstrap of model - baseline for MAE and RMSE: mae_diff, mae_diff_lo, mae_diff_hi,
    mae_verdict, rmse_diff, ..."""
    out = {}
    for stat in ("mae", "rmse"):
        r = paired_bootstrap(model_errors, baseline_errors, stat, resamples=RESAMPLES, seed=SEED, level=LEVEL)
        out.update({f"{stat}_diff": r["diff"], f"{stat}_diff_lo": r["lo"], f"{stat}_diff_hi": r["hi"],
                    f"{stat}_verdict": r["verdict"]})
    return out


def baseline_errors(data_dir: str, examples: list[dict]) -> dict[str, np.ndarray]:
    """Signed per-row errors (prediction - label) of every baseline on exactly these rows (fitted on train,
    chosen on val: no test labels)."""
    splits = load_splits(data_dir)
    fitted, data, scale = fit_baselines(splits["train"], splits["val"], target_pairs(splits["test"]))
    y = np.array([ex["rating"] for ex in examples], dtype=np.float64)
    return {name: predict_examples(fb.model, data, examples, scale) - y for name, fb in fitted.items()}


def baseline_rows(data_dir: str, examples: list[dict]) -> dict[str, dict]:
    """MAE/RMSE (with bootstrap intervals) of every baseline on exactly these rows."""
    return {name: interval_metrics(err) for name, err in baseline_errors(data_dir, examples).items()}


def evaluate_model(cfg: ExperimentConfig, split: str, limit: int, batch_size: int) -> tuple[dict, list[dict]]:
    policy = load_policy(cfg.model, for_training=False)
    task = RecTask(cfg.task, policy.tokenizer)
    items = task.items(split)
    if limit > 0:
        items = items[:limit]
    start = time.perf_counter()
    completions, lengths = greedy_completions(policy, [it["prompt"] for it in items], cfg.sampling, batch_size,
                                              progress=True)
    seconds = time.perf_counter() - start
    metrics, rows = score_completions(task, items, completions, task.demonstrations)
    metrics.update({"len_mean": float(np.mean(lengths)), "time_s": seconds,
                    "s_per_example": seconds / max(len(items), 1)})
    return metrics, rows


def score_completions(task: RecTask, items, completions: list[str], demos: list[str]) -> tuple[dict, list[dict]]:
    """Every metric of a set of completions that does not need the model: rating metrics (headline and
    fallback), bootstrap intervals, copy rate; and the per-row records."""
    rows = task.predictions(items, completions)
    scale = task.scale(items[0]["example"]) if len(items) else (1.0, 5.0)
    labels = [r["label"] for r in rows]
    failed = [r["rating"] is None for r in rows]
    metrics = rating_metrics(labels, [r["prediction"] for r in rows], failed, scale)
    scored = scored_predictions(labels, [r["prediction"] for r in rows], failed, scale)
    metrics.update(interval_metrics(scored - np.asarray(labels, dtype=np.float64)))
    answers = [task.answer(c) for c in completions]
    copies = copy_rate(answers, demos)
    about = [subjects(it["example"]) for it in items]
    unrelated = copy_rate(answers, demos, related=about)
    metrics.update({"fallback": task.cfg.fallback, "failure_scored_as": "farthest rating from the label",
                    "ci_level": LEVEL, "bootstrap_resamples": RESAMPLES, "bootstrap_seed": SEED,
                    "copy_rate": copies["copy_rate"], "copied": copies["copied"],
                    "copy_comparable": copies["with_ngrams"], "copy_threshold": COPY_THRESHOLD,
                    "copy_demonstrations": len(demos), "copy_rate_unrelated": unrelated["copy_rate"]})
    for row, item, completion, value, share, source in zip(rows, items, completions, scored, copies["shares"],
                                                           copies["sources"]):
        row.update({"id": item["id"], "completion": completion, "scored_as": float(value),
                    "copy_share": share, "copied_from": source})
    return metrics, rows


def _interval(m: dict, stat: str) -> str:
    value, lo, hi = m.get(stat), m.get(f"{stat}_lo"), m.get(f"{stat}_hi")
    if lo is None or hi is None:
        return f"{value:7.4f}{'':17}"
    return f"{value:7.4f} [{lo:6.4f}, {hi:6.4f}]"


def diff_text(d: dict, stat: str) -> str:
    """'MAE -0.0136 [-0.0763, +0.0490] not distinguishable' from paired_metrics' record."""
    return (f"{stat.upper()} {d[f'{stat}_diff']:+.4f} [{d[f'{stat}_diff_lo']:+.4f}, {d[f'{stat}_diff_hi']:+.4f}] "
            f"{d[f'{stat}_verdict']}")


def format_table(model_rows: dict[str, dict], baselines: dict[str, dict]) -> str:
    head = (f"{'model':<34} {'MAE [95% CI]':<24} {'RMSE [95% CI]':<24} {'MAE fb':>7} {'fmt_fail':>8} "
            f"{'copy':>6} {'copy_u':>6} {'corr':>6} {'len':>6}  predicted 1/2/3/4/5")
    lines = [head, "-" * len(head)]
    for name, m in baselines.items():
        lines.append(f"{'baseline: ' + name:<34} {_interval(m, 'mae'):<24} {_interval(m, 'rmse'):<24} {'-':>7} "
                     f"{'-':>8} {'-':>6} {'-':>6} {'-':>6} {'-':>6}")
    for name, m in model_rows.items():
        hist = "/".join(str(m.get(f"pred_hist/{r}", 0)) for r in range(1, 6))
        corr = f"{m['corr']:.3f}" if m.get("corr") == m.get("corr") else "nan"
        lines.append(f"{name[-34:]:<34} {_interval(m, 'mae'):<24} {_interval(m, 'rmse'):<24} "
                     f"{m['mae_fallback']:7.4f} {m['format_fail']:8.3f} {m['copy_rate']:6.3f} "
                     f"{m.get('copy_rate_unrelated', float('nan')):6.3f} {corr:>6} "
                     f"{m['len_mean']:6.1f}  {hist}")
        for base, d in (m.get("vs_baselines") or {}).items():
            lines.append(f"    - {base}: {diff_text(d, 'mae')}; {diff_text(d, 'rmse')}")
    return "\n".join(lines)


def check_split(data_dir: str, split: str, limit: int = 0) -> str | None:
    """None when `split` has rows to evaluate (its first `limit`, 0 = all) and each holds a numeric `rating`
    label; else a one-line error saying what is wrong and where."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        return (f"{path} not found: prepare the data first, e.g. `python -m recdata.prepare --dataset amazon-music "
                f"--out {data_dir}`")
    rows = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit and rows >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                return f"{path}:{lineno}: not valid JSON ({err})"
            label = row.get("rating") if isinstance(row, dict) else None
            if not isinstance(label, (int, float)) or isinstance(label, bool):
                return (f"{path}:{lineno}: the example has no numeric 'rating' label ({label!r}): evaluate needs "
                        f"labelled examples (`python -m experiments.predict` takes unlabelled ones)")
            rows += 1
    if not rows:
        return f"{path} holds no examples: nothing to evaluate"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="a checkpoint folder, a hub id or `default`; repeat to put several side by side")
    parser.add_argument("--data", required=True, help="a folder made by `python -m recdata.prepare`")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N rows only (0 = all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--config", default=None, help="prompt/sampling settings (default: the run's, else reczero.yaml)")
    parser.add_argument("--out", default=None, help="write the numbers (and per-row predictions) to this JSON file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. sampling.max_new_tokens=256")
    args = parser.parse_args(argv)
    if args.out:
        inputs = [Path(args.data) / name for name in ("train.jsonl", "val.jsonl", "test.jsonl", "stats.json")]
        clash = next((p for p in inputs if same_file(args.out, p)), None)
        if clash is not None:
            print(f"error: --out {args.out} is the input file {clash}: choose another --out", file=sys.stderr)
            return 2
    problem = check_split(args.data, args.split, args.limit)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    results = {}
    per_row = {}
    errors = {}
    examples = None
    for model in args.model:
        cfg, source = resolve_config(model, args.config, args.overrides + [f"task.data_dir={args.data}"])
        print(f"evaluating {model} on {args.data}/{args.split}.jsonl (prompt settings from {source})")
        metrics, rows = evaluate_model(cfg, args.split, args.limit, args.batch_size)
        metrics["config"] = source
        results[model] = metrics
        per_row[model] = rows
        errors[model] = np.array([r["scored_as"] - r["label"] for r in rows], dtype=np.float64)
        if examples is None:
            task = RecTask(cfg.task, load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path))
            examples = task.examples(args.split)[: args.limit or None]
    base_errors = baseline_errors(args.data, examples) if args.split == "test" else {}
    baselines = {name: interval_metrics(err) for name, err in base_errors.items()}
    for model, metrics in results.items():
        metrics["vs_baselines"] = {name: paired_metrics(errors[model], err) for name, err in base_errors.items()}
    print(format_table(results, baselines))
    failed_note = results[args.model[0]]["fallback"]
    print(f"(n = {len(examples)} rows of {args.split}; MAE / RMSE score a failed answer as the rating farthest "
          f"from the label, 'MAE fb' as the {failed_note} rating; [..]: {LEVEL:.0%} bootstrap intervals over rows, "
          f"{RESAMPLES} resamples; under each model: model - baseline on the same rows, paired bootstrap; "
          f"copy: answers sharing > {COPY_THRESHOLD:.0%} of their word 6-grams with another answer or the "
          f"demonstration; copy_u: the same, compared only with answers about another user and another item)")
    if args.out:
        record = {"data": args.data, "split": args.split, "n": len(examples),
                  "command": "python -m experiments.evaluate " + " ".join(argv or sys.argv[1:]),
                  "models": results, "baselines_same_rows": baselines, "predictions": per_row}
        with atomic_write(args.out) as f:
            f.write(json.dumps(json_safe(record), indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
