"""Evaluate a model on a prepared split, next to the classic baselines on the same rows.

    python -m experiments.evaluate --model runs/reczero/checkpoints/step_16 --data data/amazon-music
    python -m experiments.evaluate --model default --data data/amazon-music --limit 64 --out untrained.json

Greedy decoding (PAPER.md: metrics use greedy decoding). Reports MAE, RMSE, the format-failure rate (a
failed answer is scored with a documented fallback, by default the user's average rating, and is never
counted as correct), the histogram of predicted ratings and their correlation with the labels (a model
that collapsed to "always 5" shows at a glance), mean completion length and time.

The prompt settings (template, one-shot, prefill, token budget) are read from the run's config.yaml when
the model is a checkpoint of a run, else from --config (default: experiments/configs/reczero.yaml), so a
model is evaluated with the prompts it was trained on.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from experiments.baselines import fit_baselines, load_splits, predict_examples, target_pairs
from experiments.config import ExperimentConfig, load_experiment
from experiments.task import RecTask, rating_metrics
from grpo.config import apply_overrides, build_config, read_config_values
from grpo.models import load_tokenizer
from grpo.runlog import write_json
from grpo.train import greedy_completions, load_policy

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


def baseline_rows(data_dir: str, examples: list[dict]) -> dict[str, dict]:
    """MAE/RMSE of every baseline on exactly these rows (fitted on train, chosen on val: no test labels)."""
    splits = load_splits(data_dir)
    fitted, data, scale = fit_baselines(splits["train"], splits["val"], target_pairs(splits["test"]))
    y = np.array([ex["rating"] for ex in examples], dtype=np.float64)
    out = {}
    for name, fb in fitted.items():
        p = predict_examples(fb.model, data, examples, scale)
        out[name] = {"mae": float(np.mean(np.abs(y - p))), "rmse": float(np.sqrt(np.mean((y - p) ** 2)))}
    return out


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
    rows = task.predictions(items, completions)
    scale = task.scale(items[0]["example"])
    metrics = rating_metrics([r["label"] for r in rows], [r["prediction"] for r in rows],
                             [r["rating"] is None for r in rows], scale)
    metrics.update({"len_mean": float(np.mean(lengths)), "time_s": seconds,
                    "s_per_example": seconds / max(len(items), 1), "fallback": cfg.task.fallback})
    for row, item, completion in zip(rows, items, completions):
        row["id"] = item["id"]
        row["completion"] = completion
    return metrics, rows


def format_table(model_rows: dict[str, dict], baselines: dict[str, dict]) -> str:
    head = f"{'model':<34} {'MAE':>7} {'RMSE':>7} {'fmt_fail':>8} {'corr':>6} {'len':>6}  predicted 1/2/3/4/5"
    lines = [head, "-" * len(head)]
    for name, m in baselines.items():
        lines.append(f"{'baseline: ' + name:<34} {m['mae']:7.4f} {m['rmse']:7.4f} {'-':>8} {'-':>6} {'-':>6}")
    for name, m in model_rows.items():
        hist = "/".join(str(m.get(f"pred_hist/{r}", 0)) for r in range(1, 6))
        corr = f"{m['corr']:.3f}" if m.get("corr") == m.get("corr") else "nan"
        lines.append(f"{name[-34:]:<34} {m['mae']:7.4f} {m['rmse']:7.4f} {m['format_fail']:8.3f} {corr:>6} "
                     f"{m['len_mean']:6.1f}  {hist}")
    return "\n".join(lines)


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

    results = {}
    per_row = {}
    examples = None
    for model in args.model:
        cfg, source = resolve_config(model, args.config, args.overrides + [f"task.data_dir={args.data}"])
        print(f"evaluating {model} on {args.data}/{args.split}.jsonl (prompt settings from {source})")
        metrics, rows = evaluate_model(cfg, args.split, args.limit, args.batch_size)
        metrics["config"] = source
        results[model] = metrics
        per_row[model] = rows
        if examples is None:
            task = RecTask(cfg.task, load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path))
            examples = task.examples(args.split)[: args.limit or None]
    baselines = baseline_rows(args.data, examples) if args.split == "test" else {}
    print(format_table(results, baselines))
    failed_note = results[args.model[0]]["fallback"]
    print(f"(n = {len(examples)} rows of {args.split}; a failed answer is scored as the {failed_note} rating)")
    if args.out:
        write_json(Path(args.out), {"data": args.data, "split": args.split, "n": len(examples),
                                    "command": "python -m experiments.evaluate " + " ".join(argv or sys.argv[1:]),
                                    "models": results, "baselines_same_rows": baselines, "predictions": per_row})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
