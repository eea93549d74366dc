"""Reward and template ablations (docs/paper.md, "Ablation variants"): the same model, data, seeds and GRPO budget
trained once per variant, each through the same loop as `experiments.train` (grpo.train.train).

    python -m experiments.ablate_reward --budget small          # SmolLM2-135M on the 2-core CPU, 7 variants, < 1 h
    python -m experiments.ablate_reward --budget paper          # Qwen2.5-7B-Instruct, the paper's settings (GPU)
    python -m experiments.ablate_reward --variants paper,exact_match grpo.steps=10     # a subset; any key=value
    python -m experiments.ablate_reward exact_match:grpo.lr=1e-5                        # an override for one variant

Variants (`--variants`, default: the first seven):
    paper           the paper's reward: format +-0.5, answer 1 - |y - y_hat| / 4 (four-step `tbr` template)
    format_only     the format term alone
    answer_only     the answer term alone, no format term (a rating anywhere in a last <rate> block counts)
    authors_code    the authors' released code: format +-1, answer 1 - |y - y_hat| / 2
    exact_match     +2 for the exact rating, else -1.5
    no_think        template `answer_only`: <rate> alone, no reasoning (paper reward)
    single_think    template `single_think`: one <think> block, then <rate> (paper reward)
    partial_format  (optional) the project's default reward: paper's, plus partial credit for malformed answers

Each variant changes the reward and template only; the template variants also move the prefill to their own
first tag when the base config prefills one ("<analyze user>\\n" -> "<think>\\n" / "<rate>\\n"; an empty prefill
stays empty). The stop string "</rate>" fits every template (each ends with its <rate> block), and the one-shot
demonstration is always the template's own.

Outputs in --out (default runs/ablate_<budget>): <variant>/ (a normal run folder plus variant.json: status,
error, wall time, the command), ablation.md and ablation.csv (final validation MAE, RMSE, format failures,
share of integer ratings, tokens per answer, wall time; one row per variant) and ablation_curves.png. A variant
whose variant.json says done is skipped on a rerun (--force retrains); one that crashes is recorded as failed
with its error, the others still run, and the exit status is 1. A failed or interrupted variant starts again
from scratch on a rerun, or from its latest checkpoint when it saved one (run.save_every).

Time (--budget small, experiments/configs/ablate_small.yaml; from the default run's measured ~49 s per GRPO
step at 2 prompts x 4 completions x 160 new tokens and ~3.7 s per greedy evaluation answer on the 2-core CPU):
per variant ~10 s loading + 2 evaluations of 12 validation rows (~45 s each) + 6 steps (~5 min) + ~10 s for
the final checkpoint = ~6.8 min; seven variants ~45 min (no_think stops after a few tokens once it answers, so
a little less), on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from experiments.config import ExperimentConfig
from experiments.runs import (Column, clear_run_files, config_diff, get_key, load_run, markdown_table, read_json,
                              set_key, split_scoped, with_overrides, write_csv, write_text)
from experiments.train import run_experiment
from grpo.config import ConfigError, build_config, read_config_values, save_config
from grpo.runlog import plot_runs, write_json
from grpo.checkpoint import find_latest_checkpoint
from prompts import TEMPLATES, reward_range
from prompts.templates import open_tag

CONFIGS = Path(__file__).parent / "configs"
BUDGETS = {"small": CONFIGS / "ablate_small.yaml", "paper": CONFIGS / "ablate_qwen7b.yaml"}


@dataclass(frozen=True)
class Variant:
    reward: str
    template: str
    about: str


VARIANTS: dict[str, Variant] = {
    "paper": Variant("paper", "tbr", "the paper's reward: format +-0.5, answer 1 - |y - y_hat| / 4"),
    "format_only": Variant("format_only", "tbr", "format term only (+-0.5)"),
    "answer_only": Variant("answer_only", "tbr", "answer term only, no format term"),
    "authors_code": Variant("authors_code", "tbr", "authors' code: format +-1, answer 1 - |y - y_hat| / 2"),
    "exact_match": Variant("exact_match", "tbr", "+2 for the exact rating, else -1.5"),
    "no_think": Variant("paper", "answer_only", "template answer_only: <rate> alone (paper reward)"),
    "single_think": Variant("paper", "single_think", "template single_think: <think> then <rate> (paper reward)"),
    "partial_format": Variant("partial_format", "tbr", "the project's default: paper + partial format credit"),
}
DEFAULT_VARIANTS = ("paper", "format_only", "answer_only", "authors_code", "exact_match", "no_think", "single_think")
MARKER = "variant.json"


# ----------------------------------------------------------------------------------------------------------
# One variant's config
# ----------------------------------------------------------------------------------------------------------
def template_prefill(template: str, base_prefill: str, base_template: str) -> str:
    """The base config's prefill carried over to another template: an empty prefill stays empty; a prefill
    that is the base template's first open tag (with any surrounding whitespace) becomes the new template's
    first open tag with the same whitespace. Anything else cannot be carried over: ValueError."""
    if not base_prefill:
        return ""
    first = open_tag(TEMPLATES[base_template].sections[0])
    if base_prefill.strip() != first:
        raise ValueError(f"task.prefill {base_prefill!r} is not the first tag of template {base_template!r}, so it "
                         f"cannot be carried over to template {template!r}: give that variant its own prefill "
                         f"(VARIANT:task.prefill=...)")
    before, after = base_prefill.split(first, 1)
    return before + open_tag(TEMPLATES[template].sections[0]) + after


def variant_values(name: str, base: dict, folder: Path, overrides: list[str] = ()) -> dict:
    """The raw config of one variant: the base (YAML + global overrides), then the variant's reward, template
    and prefill, its run folder, then the overrides scoped to this variant."""
    variant = VARIANTS[name]
    values = with_overrides(base, [])
    base_template = get_key(values, "task.template") or "tbr"
    set_key(values, "task.reward", variant.reward)
    set_key(values, "task.template", variant.template)
    sets_prefill = any(o.split("=", 1)[0].strip() == "task.prefill" for o in overrides)
    if variant.template != base_template and not sets_prefill:
        set_key(values, "task.prefill",
                template_prefill(variant.template, get_key(values, "task.prefill") or "", base_template))
    # Every template ends with the same <rate> block, so stop strings such as "</rate>" fit them all.
    assert TEMPLATES[variant.template].answer_section == TEMPLATES[base_template].answer_section
    set_key(values, "run.name", f"{get_key(values, 'run.name') or 'ablate'}_{name}")
    set_key(values, "run.output_dir", str(folder))
    return with_overrides(values, list(overrides))


# ----------------------------------------------------------------------------------------------------------
# Running the variants
# ----------------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_variant(name: str, base: dict, out: Path, overrides: list[str], *, force: bool = False,
                command: str = "") -> dict:
    """Train one variant unless it is already done; returns its variant.json record. Never raises on a
    failure of the variant itself (the error is recorded); KeyboardInterrupt still stops everything."""
    folder = out / name
    marker = folder / MARKER
    previous = read_json(marker)
    variant = VARIANTS[name]
    record = {"variant": name, "reward": variant.reward, "template": variant.template, "about": variant.about,
              "status": "running", "command": command, "started": _now(),
              "train_command": f"python -m experiments.train --config {folder / 'config.yaml'}"}
    t0 = time.perf_counter()
    try:
        values = variant_values(name, base, folder, overrides)
    except (ConfigError, ValueError) as exc:
        return _failed(record, exc, marker, t0)
    if previous.get("status") == "done" and (folder / "eval.json").exists() and not force:
        saved = load_run(folder).config if (folder / "config.yaml").exists() else {}
        diff = config_diff(saved, values, ignore=("run.resume",))
        record = {**previous, "skipped": True}
        record["note"] = ("finished earlier with other settings (" + "; ".join(diff) + "); --force retrains"
                          if diff else "")
        print(f"[{name}] done already, skipped{': ' + record['note'] if diff else ''}")
        return record

    try:
        folder.mkdir(parents=True, exist_ok=True)
        resumable = find_latest_checkpoint(folder) if (folder / "checkpoints").exists() else None
        same_settings = (folder / "config.yaml").exists() and not config_diff(
            load_run(folder).config, values, ignore=("run.resume",))
        if resumable is not None and same_settings and not force:
            set_key(values, "run.resume", "latest")
            print(f"[{name}] continuing from {resumable}")
        else:
            clear_run_files(folder)
        cfg = build_config(ExperimentConfig, values)  # a bad override scoped to this variant fails only it
        record["prefill"] = cfg.task.prefill
        write_json(marker, record)
        print(f"[{name}] training: reward {cfg.task.reward}, template {cfg.task.template}, "
              f"prefill {cfg.task.prefill!r}, {cfg.grpo.steps} steps -> {folder}")
        run_experiment(cfg)
    except Exception as exc:  # noqa: BLE001 -- one variant's crash must not lose the others
        return _failed(record, exc, marker, t0)
    record.update(status="done", error=None, finished=_now(), wall_s=time.perf_counter() - t0)
    write_json(marker, record)
    return record


def _failed(record: dict, exc: Exception, marker: Path, t0: float) -> dict:
    record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:],
                  finished=_now(), wall_s=time.perf_counter() - t0)
    print(f"[{record['variant']}] FAILED: {record['error']}", file=sys.stderr)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_json(marker, record)
    return record


# ----------------------------------------------------------------------------------------------------------
# The table and the figure
# ----------------------------------------------------------------------------------------------------------
COLUMNS = [
    Column("variant", "variant"), Column("reward", "reward"), Column("template", "template"),
    Column("status", "status"), Column("steps", "steps"), Column("n", "val rows"),
    Column("mae_start", "MAE step 0", ".4f"), Column("mae", "MAE", ".4f"), Column("rmse", "RMSE", ".4f"),
    Column("format_fail", "format failures", ".3f"), Column("integer_share", "integer ratings", ".3f"),
    Column("len_mean", "tokens / answer", ".1f"), Column("train_reward", "train reward (last step)", ".3f"),
    Column("train_format_ok", "train format ok (last step)", ".3f"),
    Column("tied_groups", "tied groups (mean)", ".2f"), Column("wall_s", "wall time", "time"),
    Column("note", "note"),
]
CSV_KEYS = [c.key for c in COLUMNS] + ["corr", "mae_parsed_only", "folder", "train_command", "command"]


def variant_row(name: str, out: Path, record: dict) -> dict:
    variant = VARIANTS[name]
    row = {"variant": name, "reward": variant.reward, "template": variant.template,
           "status": record.get("status", "missing"), "wall_s": record.get("wall_s"), "folder": str(out / name),
           "train_command": record.get("train_command"), "command": record.get("command"),
           "note": record.get("error") or record.get("note") or ""}
    if row["status"] == "done" and (out / name / "eval.json").exists():
        run = load_run(out / name)
        final = run.final_metrics()
        train_rows = run.train_rows()
        row.update({k: final.get(k) for k in ("n", "mae", "rmse", "format_fail", "integer_share", "len_mean", "corr",
                                              "mae_parsed_only")})
        row.update(steps=final.get("step"), mae_start=run.start_metrics().get("mae"),
                   train_reward=train_rows[-1]["reward/mean"] if train_rows else None,
                   train_format_ok=train_rows[-1].get("reward/format_ok") if train_rows else None,
                   tied_groups=(sum(r["adv/frac_zero_std"] for r in train_rows) / len(train_rows)
                                if train_rows else None))
    return row


def curves(out: Path, names: list[str]) -> dict[str, list[dict]]:
    """Per finished variant: its metric rows, with `reward/normalised` (the training reward mapped to [0, 1] by
    the reward's own range, so that rewards of different scales share an axis)."""
    runs = {}
    for name in names:
        if read_json(out / name / MARKER).get("status") != "done" or not (out / name / "metrics.jsonl").exists():
            continue
        run = load_run(out / name)
        lo, hi = reward_range(get_key(run.config, "task.reward") or VARIANTS[name].reward)
        rows = [dict(r, **{"reward/normalised": (r["reward/mean"] - lo) / (hi - lo)}) for r in run.train_rows()]
        runs[name] = rows + run.eval_rows()
    return runs


CURVE_TITLES = {"reward/normalised": "train reward (0 = its min, 1 = its max)",
                "reward/format_ok": "train: well-formed samples", "eval/mae": "validation MAE",
                "eval/format_fail": "validation format failures"}


def write_outputs(out: Path, names: list[str], records: dict[str, dict], header: str) -> list[dict]:
    rows = [variant_row(n, out, records.get(n, {})) for n in names]
    lines = [header, "", markdown_table(rows, COLUMNS), ""]
    lines += ["Variants:", ""] + [f"- `{n}`: {VARIANTS[n].about}" for n in names] + [""]
    lines += ["MAE / RMSE: greedy decoding on the first `val rows` validation examples after the last step (a failed "
              "answer is scored as the user's average rating); `MAE step 0` is the same model before training. "
              "`integer ratings`: share of the parsed ratings that are whole numbers. `tied groups`: share of the "
              "groups whose rewards were all equal (they give no gradient), averaged over the steps. `wall time`: "
              "the whole variant (loading, evaluations, checkpoint). Each variant reproduces alone with the "
              "`train_command` of ablation.csv.", ""]
    write_text(out / "ablation.md", "\n".join(lines))
    write_csv(out / "ablation.csv", rows, CSV_KEYS)
    if importlib.util.find_spec("matplotlib") is None:  # a dependency, but the tables must not need it
        print("matplotlib is not installed: no ablation_curves.png", file=sys.stderr)
    else:
        plot_runs(curves(out, names), list(CURVE_TITLES), out / "ablation_curves.png",
                  title=f"ablation: {out.name}", titles=CURVE_TITLES)
    return rows


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="small",
                        help="small: experiments/configs/ablate_small.yaml (CPU); paper: ablate_qwen7b.yaml (GPU)")
    parser.add_argument("--config", default=None, help="a base config instead of the budget's")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--out", default=None, help="default runs/ablate_<budget> (runs/<config name> with --config)")
    parser.add_argument("--force", action="store_true", help="retrain variants that are already done")
    parser.add_argument("overrides", nargs="*",
                        help="key=value for every variant, VARIANT:key=value for one (e.g. exact_match:grpo.lr=1e-5)")
    args = parser.parse_args(argv)

    config = Path(args.config) if args.config else BUDGETS[args.budget]
    out = Path(args.out) if args.out else Path("runs") / (config.stem if args.config else f"ablate_{args.budget}")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        print(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    try:
        plain, scoped = split_scoped(args.overrides, VARIANTS)
        base = with_overrides(read_config_values(config), plain)
        build_config(ExperimentConfig, base)  # a bad global setting stops here, before anything is trained
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    save_config(build_config(ExperimentConfig, base), out / "base_config.yaml")
    command = "python -m experiments.ablate_reward " + shlex.join(sys.argv[1:] if argv is None else argv)
    records = {}
    for name in names:
        records[name] = run_variant(name, base, out, scoped[name], force=args.force, command=command)
    # Variants finished by an earlier call (not asked for this time) stay in the table.
    shown = [n for n in VARIANTS if n in names or (out / n / MARKER).exists()]
    for name in shown:
        records.setdefault(name, read_json(out / name / MARKER))
    header = (f"# Ablation: {out}\n\nBase config `{config}`"
              + (f" with `{' '.join(plain)}`" if plain else "") + f"; written {_now()} by `{command}`.")
    rows = write_outputs(out, shown, records, header)
    print(markdown_table(rows, [c for c in COLUMNS if c.key != "note"]))
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.csv'}" +
          (f", {out / 'ablation_curves.png'}" if (out / "ablation_curves.png").exists() else ""))
    failed = [n for n in names if records[n].get("status") != "done"]
    if failed:
        print(f"failed: {', '.join(failed)} (see {MARKER} in their folders)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
