"""The run folder: metrics.jsonl, samples.jsonl, curves.png, eval.json, optional TensorBoard.

Everything a person wants to look at after (or during) a run, in plain files:
- metrics.jsonl: one JSON object per step, `step` plus namespaced keys (`reward/mean`, `eval/mae` ...).
- samples.jsonl: prompts, completions, rewards and advantages, the most useful debugging aid in RL.
- curves.png: the key curves, redrawn as training goes.
- run.json: the command line that wrote the folder, when, and its wall time (RunRecord).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def _clean(value):
    """JSON-safe numbers: NaN/inf become null, tensors and numpy scalars become Python floats."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file. A last line cut short by a kill (no newline, not valid JSON) is dropped;
    a broken line anywhere else is an error naming it."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if number == len(lines):  # the torn tail of an interrupted append
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
    return records


def write_json(path: Path, record: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(_clean(record), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "samples.jsonl", "eval.json", "curves.png", "checkpoints",
             "tensorboard")


def claim_run_folder(run_dir: Path, resume: str, overwrite: bool, delete: bool = True) -> None:
    """Make sure a run may write into `run_dir`: a folder that holds a run is continued (`run.resume`) or,
    with `run.overwrite`, emptied of that run's files (when `delete`: rank 0 under torchrun); anything else
    is refused before a single file is written, so a finished run is never trained over by accident."""
    held = [name for name in RUN_FILES if (Path(run_dir) / name).exists()]
    if not held or resume:
        return
    if not overwrite:
        raise FileExistsError(f"{run_dir} already holds a run ({', '.join(held)}): continue it with "
                              "run.resume=latest, start it over with run.overwrite=true, or choose another "
                              "run.name / run.output_dir")
    for name in held if delete else []:
        path = Path(run_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


class RunLog:
    """The run folder's writer. Under torchrun only rank 0 writes: the other ranks' logs are `enabled=False`
    and every method is then a no-op, so the loop needs no rank checks around its logging."""

    def __init__(self, run_dir: Path, curve_keys: list[str], tensorboard: bool = False, plot: bool = True,
                 enabled: bool = True):
        self.dir = Path(run_dir)
        self.enabled = enabled
        tensorboard, plot = tensorboard and enabled, plot and enabled
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.samples_path = self.dir / "samples.jsonl"
        self.curve_keys = curve_keys
        self.plot_enabled = plot
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is optional
                raise ImportError("run.tensorboard=true needs `pip install tensorboard`") from e
            self.tb = SummaryWriter(str(self.dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume: forget metric lines of steps after the checkpoint (all of them for step -1: a run
        killed before its first checkpoint starts over), so the curves stay one line."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
                tmp = Path(str(path) + ".tmp")
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
                tmp.replace(path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.metrics_path, {"step": step, **metrics})
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def samples(self, step: int, records: list[dict]) -> None:
        if not self.enabled:
            return
        for record in records:
            append_jsonl(self.samples_path, {"step": step, **record})

    def plot(self) -> None:
        if self.plot_enabled and self.metrics_path.exists():
            plot_curves(read_jsonl(self.metrics_path), self.curve_keys, self.dir / "curves.png")

    def print(self, message: str) -> None:
        """A message for the person watching, above the progress bar."""
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(message)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(rows: list[dict], keys: list[str], path: Path, title: str = "") -> None:
    """One panel per key present in the rows, against `step`."""
    plot_runs({"": rows}, keys, path, title=title)


def plot_runs(runs: dict[str, list[dict]], keys: list[str], path: Path, title: str = "",
              titles: dict[str, str] | None = None) -> bool:
    """One panel per key, one line per run (label -> metric rows), against `step`; a legend when the runs
    have labels. Keys no run has are left out; returns False (and writes nothing) when none is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(r.get(k) is not None for rows in runs.values() for r in rows)]
    if not keys:
        return False
    legend_rows = math.ceil(sum(1 for label in runs if label) / 4)  # labels under the panels, four a row
    legend_h = 0.15 + 0.2 * legend_rows if legend_rows else 0.0
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2 + legend_h), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (label, rows) in enumerate(runs.items()):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label or None,
                    color=f"C{i % 10}")  # one colour per run in every panel
        ax.set_title((titles or {}).get(key, key))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    legend = {}  # label -> line, over every panel (a run may lack a metric and so miss from some panels)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if legend:
        fig.subplots_adjust(bottom=(legend_h + 0.45) / (3.2 + legend_h))
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 4), fontsize=8,
                   frameon=False)
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return True


def command_line(argv: list[str] | None = None) -> str:
    """This process's command line as one would type it: `python -m experiments.train --config X k=v`."""
    argv = list(sys.argv if argv is None else argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        program = ["python", "-m", spec.name.removesuffix(".__main__")]
    else:
        program = ["python", argv[0]] if argv and argv[0].endswith(".py") else argv[:1]
    return " ".join(shlex.quote(a) for a in program + argv[1:])


class RunRecord:
    """run.json: the command line that wrote this run folder, when, and for how long. A resumed run keeps
    one entry per session (`sessions`), and `wall_s` sums them; `finished` is true once the run ends."""

    def __init__(self, run_dir: Path, resumed: bool = False, **extra):
        self.path = Path(run_dir) / "run.json"
        previous = {}
        if resumed and self.path.exists():
            try:
                previous = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = {}
        self.sessions = list(previous.get("sessions", []))
        self.sessions.append({"command": command_line(), "cwd": os.getcwd(), "started": _now(), **extra})
        self._t0 = time.perf_counter()
        self._write(finished=False)

    def heartbeat(self, **extra) -> None:
        """Record the wall time so far (each step): a killed session still counts up to its last beat."""
        self.sessions[-1].update({"last_seen": _now(), "wall_s": time.perf_counter() - self._t0, **extra})
        self._write(finished=False)

    def finish(self, **extra) -> None:
        self.sessions[-1].update({"finished": _now(), "wall_s": time.perf_counter() - self._t0, **extra})
        self._write(finished=True)

    def _write(self, finished: bool) -> None:
        write_json(self.path, {"command": self.sessions[-1]["command"], "finished": finished,
                               "wall_s": sum(s.get("wall_s", 0.0) for s in self.sessions),
                               "sessions": self.sessions})


def run_finished(run_dir: Path) -> bool:
    """Whether `run_dir/run.json` says its run ended (`RunRecord.finish`)."""
    path = Path(run_dir) / "run.json"
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("finished"))
    except (OSError, ValueError):
        return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
