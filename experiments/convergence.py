"""RecZero against RecOne under the same GRPO budget (the paper's Figure 3): validation MAE and format rate
against the GRPO step.

    python -m experiments.convergence                                        # train both, then compare
    python -m experiments.convergence --reczero runs/reczero --recone runs/recone     # finished runs only
    python -m experiments.convergence --reczero runs/reczero                  # train RecOne with RecZero's budget
    python -m experiments.convergence grpo.steps=16 recone:sft.epochs=1       # key=value for both, or one recipe

RecZero is plain GRPO from the instruct model (`experiments.train`, default config reczero.yaml); RecOne is
cold-start traces -> SFT -> the same GRPO from the SFT checkpoint (`experiments.recone`, recone.yaml). A recipe
given as a finished run folder (`--recone` takes the pipeline's root, with stages.json, or its grpo/ folder) is
reused; a missing one is trained into --out (default runs/convergence: reczero/, recone/), and a finished one
there is reused on a rerun. A recipe that is trained gets the other's budget: its grpo.steps, batch_prompts,
group_size, mu, max_new_tokens, evaluation schedule, seed and data are copied from the run it is compared with
(when both are trained, RecZero takes RecOne's: recone.yaml states the budget to compare at). Runs whose steps / batch_prompts / group_size differ are
refused (--allow-mismatch plots them anyway, with a warning); other differences that make the curves hard to
compare are warned about.

Writes convergence.png (validation MAE, validation format rate and well-formed training samples against the GRPO
step), convergence.csv (one row per recipe and step) and convergence.md (the budget, and per recipe the start,
final and best MAE, the first step with >= 90% well-formed validation answers, time and command).
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

from experiments.coldstart import ReconeConfig
from experiments.config import ExperimentConfig
from experiments.recone import run_recone
from experiments.runs import (BUDGET_KEYS, COMPARABLE_KEYS, Column, Run, clear_run_files, config_diff, get_key,
                              key_diff, load_run, markdown_table, set_key, split_scoped, with_overrides, write_csv,
                              write_text)
from experiments.train import run_experiment
from grpo.config import ConfigError, build_config, config_to_dict, read_config_values
from grpo.runlog import plot_runs
from grpo.checkpoint import find_latest_checkpoint

CONFIGS = Path(__file__).parent / "configs"
RECIPES = ("reczero", "recone")
LABELS = {"reczero": "RecZero", "recone": "RecOne"}
COPIED_KEYS = BUDGET_KEYS + COMPARABLE_KEYS
FORMAT_TARGET = 0.9  # "has learned the format": at least this share of well-formed validation answers


class Refused(Exception):
    """The two runs cannot be compared as asked (the message says why and what to do)."""


def grpo_folder(path) -> Path:
    """The GRPO run folder of a recipe given on the command line: a run folder, or RecOne's pipeline root."""
    path = Path(path)
    if (path / "stages.json").exists() and (path / "grpo" / "config.yaml").exists():
        path = path / "grpo"
    if not (path / "eval.json").exists():
        raise Refused(f"{path} is not a finished run folder (no eval.json): finish it or leave the option out "
                      "to train the recipe here")
    return path


def default_folders(out: Path) -> dict[str, Path]:
    """Where a trained recipe goes: its run folder (for RecOne the pipeline root; GRPO is in grpo/)."""
    return {"reczero": out / "reczero", "recone": out / "recone"}


def finished_here(recipe: str, folder: Path) -> Path | None:
    grpo = folder / "grpo" if recipe == "recone" else folder
    return grpo if (grpo / "eval.json").exists() else None


def plan(args, out: Path) -> tuple[dict[str, Run], dict[str, dict], list[str]]:
    """(finished runs to reuse, raw configs of the recipes to train, notes). Raises Refused / ConfigError."""
    plain, scoped = split_scoped(args.overrides, RECIPES)
    given = {"reczero": args.reczero, "recone": args.recone}
    folders = default_folders(out)
    existing: dict[str, Run] = {}
    notes: list[str] = []
    for recipe in RECIPES:
        if given[recipe]:
            existing[recipe] = load_run(grpo_folder(given[recipe]))
        elif (done := finished_here(recipe, folders[recipe])) is not None:
            existing[recipe] = load_run(done)
            notes.append(f"{LABELS[recipe]}: reusing the finished run in {done}")
    configs = {"reczero": args.reczero_config, "recone": args.recone_config}
    to_train: dict[str, dict] = {}
    for recipe in ("recone", "reczero"):  # when both are trained, RecZero takes RecOne's budget
        if recipe in existing:
            continue
        values = with_overrides(read_config_values(configs[recipe]), plain)
        other = "recone" if recipe == "reczero" else "reczero"
        reference = existing[other].config if other in existing else to_train.get(other)
        if reference is not None:
            for key in COPIED_KEYS:
                if get_key(reference, key) is not None and get_key(values, key) != get_key(reference, key):
                    notes.append(f"{LABELS[recipe]}: {key} {get_key(values, key)!r} -> {get_key(reference, key)!r} "
                                 f"(as {LABELS[other]})")
                    set_key(values, key, get_key(reference, key))
        values = with_overrides(values, scoped[recipe])
        set_key(values, "run.output_dir", str(folders[recipe]))
        # Checked (a bad key fails before anything is trained) and resolved, so that defaults compare too.
        to_train[recipe] = config_to_dict(build_config(ReconeConfig if recipe == "recone" else ExperimentConfig,
                                                       values))
    return existing, {r: to_train[r] for r in RECIPES if r in to_train}, notes


def check_budgets(configs: dict[str, dict], allow_mismatch: bool) -> list[str]:
    """Warnings; raises Refused when the GRPO budgets differ (unless allowed)."""
    budget = key_diff(configs["reczero"], configs["recone"], BUDGET_KEYS)
    warnings = [f"the curves may not be comparable: {d} (RecZero -> RecOne)"
                for d in key_diff(configs["reczero"], configs["recone"], COMPARABLE_KEYS)]
    if budget:
        message = "the GRPO budgets differ: " + "; ".join(budget) + " (RecZero -> RecOne)"
        if not allow_mismatch:
            raise Refused(message + ". Give runs with the same budget, leave one out to train it with the other's "
                                    "budget, or pass --allow-mismatch.")
        warnings.insert(0, "warning: " + message)
    return warnings


def train_recipe(recipe: str, values: dict) -> Path:
    """Train one recipe into its folder (continuing from a checkpoint of an unfinished attempt if there is one,
    else clearing what that attempt left); returns the GRPO run folder."""
    folder = Path(values["run"]["output_dir"])
    grpo = folder / "grpo" if recipe == "recone" else folder
    resumable = recipe == "reczero" and find_latest_checkpoint(grpo) is not None
    if resumable and not config_diff(load_run(grpo).config, values, ignore=("run.resume",)):
        set_key(values, "run.resume", "latest")
    else:
        clear_run_files(grpo)
        if recipe == "recone":
            clear_run_files(folder / "sft")  # the cold-start traces file is kept: the pipeline resumes it
    print(f"training {LABELS[recipe]} -> {folder}")
    if recipe == "reczero":
        return run_experiment(build_config(ExperimentConfig, values))
    root = run_recone(build_config(ReconeConfig, values))
    return root / "grpo"


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------
def curve_rows(recipe: str, run: Run) -> list[dict]:
    """One row per step that has an evaluation or training metrics."""
    by_step: dict[int, dict] = {}
    for r in run.train_rows():
        by_step.setdefault(r["step"], {}).update(train_reward=r.get("reward/mean"),
                                                 train_format_ok=r.get("reward/format_ok"))
    for r in run.eval_rows():
        by_step.setdefault(r["step"], {}).update(eval_mae=r["eval/mae"], eval_rmse=r.get("eval/rmse"),
                                                 eval_format_rate=r.get("eval/format_ok"), eval_n=r.get("eval/n"))
    return [{"recipe": LABELS[recipe], "step": step, **values} for step, values in sorted(by_step.items())]


def summary(recipe: str, run: Run) -> dict:
    evals = run.eval_rows()
    best = min(evals, key=lambda r: (r["eval/mae"], r["step"])) if evals else {}
    learned = [r["step"] for r in evals if (r.get("eval/format_ok") or 0.0) >= FORMAT_TARGET]
    start = run.start_metrics()
    final = run.final_metrics()
    seconds, source = run.wall_time()
    return {"recipe": LABELS[recipe], "steps": get_key(run.config, "grpo.steps"), "n": final.get("n"),
            "mae_start": start.get("mae"), "mae": final.get("mae"), "rmse": final.get("rmse"),
            "best_mae": best.get("eval/mae"), "best_step": best.get("step"),
            "format_rate_start": start.get("format_ok"),
            "format_rate": None if final.get("format_fail") is None else 1.0 - final["format_fail"],
            "format_step": learned[0] if learned else None, "grpo_wall_s": seconds, "time_source": source,
            "folder": str(run.path), "command": run.command()}


SUMMARY_COLUMNS = [
    Column("recipe", "recipe"), Column("steps", "GRPO steps"), Column("n", "val rows"),
    Column("mae_start", "MAE step 0", ".4f"), Column("mae", "final MAE", ".4f"), Column("rmse", "final RMSE", ".4f"),
    Column("best_mae", "best MAE", ".4f"), Column("best_step", "at step"),
    Column("format_rate_start", "format rate step 0", ".3f"), Column("format_rate", "final format rate", ".3f"),
    Column("format_step", f"first step >= {FORMAT_TARGET:.0%} well formed"),
    Column("grpo_wall_s", "GRPO wall time", "time"), Column("folder", "folder"),
]
CURVE_KEYS = ["recipe", "step", "eval_mae", "eval_rmse", "eval_format_rate", "eval_n", "train_reward",
              "train_format_ok"]
CURVE_TITLES = {"eval/mae": "validation MAE", "eval/format_ok": "validation: well-formed answers",
                "reward/format_ok": "train: well-formed samples"}


def write_outputs(out: Path, runs: dict[str, Run], notes: list[str], command: str) -> list[dict]:
    rows = [summary(recipe, runs[recipe]) for recipe in RECIPES]
    write_csv(out / "convergence.csv", [r for recipe in RECIPES for r in curve_rows(recipe, runs[recipe])],
              CURVE_KEYS)
    budget = [Column("key", "setting"), Column("reczero", "RecZero"), Column("recone", "RecOne")]
    budget_rows = [{"key": k, **{r: get_key(runs[r].config, k) for r in RECIPES}} for k in COPIED_KEYS]
    lines = [f"# RecZero vs RecOne: {out}", "", f"Written by `{command}`.", "", "## Budget", "",
             markdown_table(budget_rows, budget), "", "## Results", "", markdown_table(rows, SUMMARY_COLUMNS), "",
             "Validation MAE: greedy decoding on the first `val rows` validation examples (a failed answer is scored "
             "as the user's average rating). Step 0 is the model GRPO starts from: the instruct model for RecZero, "
             "the SFT checkpoint for RecOne. GRPO wall time leaves out RecOne's cold start and SFT. Curves: "
             "convergence.png, numbers per step: convergence.csv.", "", "Commands:", ""]
    lines += [f"- {r['recipe']}: `{r['command']}`" for r in rows]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    write_text(out / "convergence.md", "\n".join(lines) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no convergence.png", file=sys.stderr)
    else:
        curves = {LABELS[r]: runs[r].train_rows() + runs[r].eval_rows() for r in RECIPES}
        plot_runs(curves, list(CURVE_TITLES), out / "convergence.png", title="RecZero vs RecOne (same GRPO budget)",
                  titles=CURVE_TITLES)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reczero", help="a finished RecZero run folder to reuse")
    parser.add_argument("--recone", help="a finished RecOne run: the pipeline root (stages.json) or its grpo/ folder")
    parser.add_argument("--reczero-config", default=str(CONFIGS / "reczero.yaml"), help="to train RecZero")
    parser.add_argument("--recone-config", default=str(CONFIGS / "recone.yaml"), help="to train RecOne")
    parser.add_argument("--out", default="runs/convergence")
    parser.add_argument("--allow-mismatch", action="store_true", help="compare runs whose GRPO budgets differ")
    parser.add_argument("overrides", nargs="*",
                        help="key=value for the recipes trained here; reczero:key=value or recone:key=value for one")
    args = parser.parse_args(argv)
    out = Path(args.out)
    command = "python -m experiments.convergence " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        existing, to_train, notes = plan(args, out)
        configs = {r: existing[r].config if r in existing else to_train[r] for r in RECIPES}
        notes += check_budgets(configs, args.allow_mismatch)
    except (Refused, ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"convergence: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(note)
    runs = dict(existing)
    for recipe, values in to_train.items():
        runs[recipe] = load_run(train_recipe(recipe, values))
    out.mkdir(parents=True, exist_ok=True)
    rows = write_outputs(out, runs, notes, command)
    print(markdown_table(rows, [c for c in SUMMARY_COLUMNS if c.key != "folder"]))
    print(f"wrote {out / 'convergence.md'}, {out / 'convergence.csv'}"
          + (f", {out / 'convergence.png'}" if (out / "convergence.png").exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
