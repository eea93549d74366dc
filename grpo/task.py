"""The small interface through which the engine sees a task. The engine never inspects completion text:
what a completion is worth is the task's business (README, "Read the code in this order": `grpo`
knows nothing of recommendation).

An *item* is a dict with at least `id` and `prompt` (the full prompt text, chat template applied); the task
may keep anything else in it (the label, the raw example) and gets the item back when scoring.
"""
from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    curve_keys: list[str]
    """Metric keys worth a panel in curves.png (besides reward/mean), e.g. ['reward/format_ok', 'eval/mae']."""

    def items(self, split: str) -> list[dict]:
        """The prompts of a split ('train', 'val', 'test'), each a dict with `id` and `prompt`."""
        ...

    def reward(self, item: dict, completion: str) -> tuple[float, dict[str, float]]:
        """Score one completion: (total reward, named parts for logging; NaN where a part is undefined)."""
        ...

    def evaluate(self, items: list[dict], completions: list[str]) -> dict[str, float]:
        """Summarise greedy completions of held-out items as evaluation metrics (e.g. MAE, RMSE)."""
        ...

    def describe(self, item: dict, completion: str) -> dict:
        """Extra fields for a sample dump (e.g. the parsed answer and the label)."""
        ...
