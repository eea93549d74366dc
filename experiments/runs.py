"""Reading run folders, comparing their budgets and writing result tables: shared by the ablation,
convergence and report commands.

A run folder (grpo.train / grpo.sft) holds config.yaml, metrics.jsonl, eval.json once finished, run.json
(command line and wall time; runs from before it existed lack it) and checkpoints/.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from grpo.config import apply_overrides
from grpo.runlog import read_jsonl

# What makes two GRPO runs' training budgets equal (refuse to compare when these differ) and what else makes
# their curves comparable (warn when these differ).
BUDGET_KEYS = ("grpo.steps", "grpo.batch_prompts", "grpo.group_size")
COMPARABLE_KEYS = ("grpo.mu", "sampling.max_new_tokens", "run.eval_examples", "run.eval_every", "run.seed",
                   "task.data_dir")


def get_key(values: dict, dotted: str):
    """values['a']['b'] for 'a.b' (None when missing)."""
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_key(values: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def key_diff(a: dict, b: dict, keys) -> list[str]:
    """'key: a -> b' for each dotted key whose values differ."""
    return [f"{k}: {get_key(a, k)!r} -> {get_key(b, k)!r}" for k in keys if get_key(a, k) != get_key(b, k)]


def flat_keys(values: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        out += flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def config_diff(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Every setting that differs between two raw configs (dotted keys), except those under `ignore`."""
    keys = sorted(set(flat_keys(a)) | set(flat_keys(b)))
    keys = [k for k in keys if not any(k == i or k.startswith(i + ".") for i in ignore)]
    return key_diff(a, b, keys)


def split_scoped(overrides: list[str], scopes) -> tuple[list[str], dict[str, list[str]]]:
    """Plain `key=value` overrides, and `SCOPE:key=value` ones grouped by scope (a variant or a recipe).
    An unknown scope is an error that lists the known ones."""
    plain, scoped = [], {s: [] for s in scopes}
    for text in overrides:
        head = text.split("=", 1)[0]
        if ":" in head:
            scope, rest = text.split(":", 1)
            if scope not in scoped:
                raise ValueError(f"override {text!r}: unknown scope {scope!r}; known: {', '.join(scoped)}")
            scoped[scope].append(rest)
        else:
            plain.append(text)
    return plain, scoped


def with_overrides(values: dict, overrides: list[str]) -> dict:
    """A deep copy of a raw config with `key=value` overrides applied."""
    return apply_overrides(json.loads(json.dumps(values)), overrides)


# ----------------------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    config: dict
    metrics: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    """eval.json (empty while the run is not finished)."""
    record: dict = field(default_factory=dict)
    """run.json (empty for runs made before it existed)."""

    @property
    def finished(self) -> bool:
        return (self.path / "eval.json").exists()

    @property
    def dataset(self) -> str:
        return Path(str(get_key(self.config, "task.data_dir") or "?")).name

    def eval_rows(self) -> list[dict]:
        """One row per evaluation, with `eval/format_ok` (1 - format failures) added."""
        rows = []
        for r in self.metrics:
            if r.get("eval/mae") is not None:
                rows.append({**r, "eval/format_ok": 1.0 - r["eval/format_fail"]
                             if r.get("eval/format_fail") is not None else None})
        return rows

    def train_rows(self) -> list[dict]:
        return [r for r in self.metrics if "reward/mean" in r]

    def final_metrics(self) -> dict:
        """The final evaluation without the `eval/` prefix: mae, rmse, format_fail, integer_share, len_mean, n."""
        return {k.removeprefix("eval/"): v for k, v in self.final.items()}

    def start_metrics(self) -> dict:
        """The step-0 evaluation (the starting model), without the `eval/` prefix; {} if there was none."""
        for r in self.eval_rows():
            if r["step"] == 0:
                return {k.removeprefix("eval/"): v for k, v in r.items()}
        return {}

    def wall_time(self) -> tuple[float | None, str]:
        """(seconds, source): run.json's wall time when the run recorded it, else the sum of the logged step
        and evaluation times (leaves out loading and checkpointing: a lower bound)."""
        if self.record.get("finished") and self.record.get("wall_s") is not None:
            return float(self.record["wall_s"]), "run.json"
        total = 0.0
        for r in self.metrics:
            total += sum(float(v) for k, v in r.items()
                         if (k.startswith("time/") or k == "eval/time_s") and isinstance(v, (int, float)))
        return (total, "sum of logged step and eval times") if total else (None, "")

    def command(self) -> str:
        """The command line(s) that wrote the folder, or a command that reproduces it from its config."""
        sessions = self.record.get("sessions") or []
        commands = list(dict.fromkeys(s["command"] for s in sessions if s.get("command")))
        if commands:
            return " ; ".join(commands)
        return f"python -m experiments.train --config {self.path / 'config.yaml'}  (reconstructed)"


# The files grpo.train / grpo.sft write into a run folder.
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "eval.json", "curves.png", "run.json", "config.yaml", "checkpoints",
             "tensorboard")


def clear_run_files(folder: Path) -> None:
    """Remove what a run that did not finish left in its folder (its metrics would otherwise be appended to),
    and nothing else."""
    for name in RUN_FILES:
        path = Path(folder) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "metrics.jsonl").is_file() or (path / "eval.json").is_file())


def load_run(path) -> Run:
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a run folder (no config.yaml)")
    config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    metrics = read_jsonl(path / "metrics.jsonl") if (path / "metrics.jsonl").exists() else []
    final = read_json(path / "eval.json")
    record = read_json(path / "run.json")
    return Run(path, config, metrics, final, record)


def find_runs(root) -> list[Path]:
    """Every run folder under `root` (not looking inside checkpoints), sorted."""
    found = []
    for folder, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tensorboard") and not d.startswith("."))
        if is_run_dir(Path(folder)):
            found.append(Path(folder))
    return found


def read_json(path: Path) -> dict:
    """A JSON object file as a dict; {} when it is missing or not a JSON object."""
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str = ""
    """A format spec for numbers in the Markdown table ('.4f'); 'time' = seconds as 'Xm Ys'."""


def format_seconds(value: float) -> str:
    minutes, seconds = divmod(float(value), 60)
    return f"{int(minutes)}m {seconds:04.1f}s" if minutes else f"{seconds:.1f}s"


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "time" and isinstance(value, (int, float)):
        return format_seconds(value)
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c.key), c.fmt) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], keys: list[str]) -> None:
    """Raw values (full precision; empty for missing), one column per key."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for row in rows:
            values = []
            for k in keys:
                v = row.get(k)
                values.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
            writer.writerow(values)
    tmp.replace(path)


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_text(path: Path, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
