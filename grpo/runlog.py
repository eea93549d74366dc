"""The run folder: metrics.jsonl, samples.jsonl, curves.png, eval.json, optional TensorBoard.

Everything a person wants to look at after (or during) a run, in plain files:
- metrics.jsonl: one JSON object per step, `step` plus namespaced keys (`reward/mean`, `eval/mae` ...).
- samples.jsonl: prompts, completions, rewards and advantages, the most useful debugging aid in RL.
- curves.png: the key curves, redrawn as training goes.
"""
from __future__ import annotations

import json
import math
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
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: Path, record: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(_clean(record), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


class RunLog:
    def __init__(self, run_dir: Path, curve_keys: list[str], tensorboard: bool = False, plot: bool = True):
        self.dir = Path(run_dir)
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
        """On resume: forget metric lines of steps after the checkpoint, so the curves stay one line."""
        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")

    def log(self, step: int, metrics: dict) -> None:
        append_jsonl(self.metrics_path, {"step": step, **metrics})
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def samples(self, step: int, records: list[dict]) -> None:
        for record in records:
            append_jsonl(self.samples_path, {"step": step, **record})

    def plot(self) -> None:
        if self.plot_enabled and self.metrics_path.exists():
            plot_curves(read_jsonl(self.metrics_path), self.curve_keys, self.dir / "curves.png")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_curves(rows: list[dict], keys: list[str], path: Path, title: str = "") -> None:
    """One panel per key present in the rows, against `step`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
