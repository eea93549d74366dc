"""The recommendation task: prepared examples (recdata) + templates, parser and rewards (prompts), behind
the engine's small Task interface (grpo.task)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grpo.config import check
from experiments.copying import copy_rate, ngrams, reasoning_text
from prompts import (REWARDS, TEMPLATES, get_template, parse_completion, render_prompt, render_prompt_info,
                     shown_example)


@dataclass
class TaskConfig:
    data_dir: str = "data/amazon-music"
    """A folder made by `python -m recdata.prepare`: train.jsonl, val.jsonl, test.jsonl."""
    template: str = "tbr"
    """tbr (the paper's four tagged steps), answer_only (<rate> alone), single_think (<think> then <rate>)."""
    reward: str = "paper"
    """A name in prompts.rewards.REWARDS: paper, authors_code, exact_match, format_only, answer_only, partial_format."""
    one_shot: str = "none"
    """A worked example of the output format: none, inline (inside the instruction) or turn (as an earlier
    user/assistant exchange; what small models follow best)."""
    prefill: str = ""
    """Text put at the start of the assistant turn (e.g. '<analyze user>'); it counts as part of the answer."""
    raw_chatml: bool = False
    """Render the authors' hand-built ChatML string instead of the tokenizer's chat template."""
    max_prompt_tokens: int = 1536
    """Token budget of a prompt: histories and long texts are shortened, oldest first, to fit (0 = none)."""
    max_train_examples: int = 0
    """Use at most this many training examples (the first ones of train.jsonl; 0 = all)."""
    fallback: str = "user_avg"
    """What a failed answer is scored as in the secondary mae_fallback/rmse_fallback: user_avg, item_avg or
    global_mean (never the label). The headline MAE/RMSE score it as the rating farthest from the label."""
    copy_penalty: float = 0.0
    """If > 0: a training answer whose reasoning shares more than this fraction of its word 6-grams with the
    prompt's one-shot demonstration is rewarded as a malformed answer (experiments/copying.py defines the
    share; the evaluation's copy rate uses 0.3). 0 = off. Only with `one_shot` other than none."""

    def __post_init__(self):
        check("task", template=(self.template in TEMPLATES, f"must be one of {sorted(TEMPLATES)}, got {self.template!r}"),
              reward=(self.reward in REWARDS, f"must be one of {sorted(REWARDS)}, got {self.reward!r}"),
              one_shot=(self.one_shot in ("none", "inline", "turn"), f"must be none, inline or turn, got {self.one_shot!r}"),
              fallback=(self.fallback in FALLBACKS, f"must be one of {FALLBACKS}, got {self.fallback!r}"),
              max_prompt_tokens=(self.max_prompt_tokens >= 0, f"must be >= 0 (0 = none), got {self.max_prompt_tokens}"),
              max_train_examples=(self.max_train_examples >= 0, f"must be >= 0 (0 = all), got {self.max_train_examples}"),
              copy_penalty=(0 <= self.copy_penalty < 1, f"must be in [0, 1) (0 = off), got {self.copy_penalty}"))


FALLBACKS = ("user_avg", "item_avg", "global_mean")


def read_examples(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def worst_ratings(labels, scale=(1.0, 5.0)) -> np.ndarray:
    """Per label, the rating on the scale farthest from it: what a format failure is scored as in the headline
    MAE / RMSE, so that failing can never score better than any answer on the scale. A label on the scale's
    midpoint (3 on 1-5) is as far from both ends: the low end is chosen (the error is the same either way)."""
    y = np.asarray(labels, dtype=np.float64)
    lo, hi = float(scale[0]), float(scale[1])
    return np.where(y - lo >= hi - y, lo, hi)


def scored_predictions(labels, predictions, failed, scale=(1.0, 5.0)) -> np.ndarray:
    """The predictions the headline MAE / RMSE score: a parsed rating as is, a failure as `worst_ratings`."""
    p = np.asarray(predictions, dtype=np.float64)
    return np.where(np.asarray(failed, dtype=bool), worst_ratings(labels, scale), p)


def rating_metrics(labels, predictions, failed, scale=(1.0, 5.0)) -> dict[str, float]:
    """Rating metrics of an evaluation; a format failure never makes a model look better.

    `predictions`: the parsed rating of each well-formed answer, and for a failure (`failed` True) the
    fallback rating it was given (the user's average, by default). Keys:
    - mae / rmse (the headline): a failure scored as the rating farthest from the label (`worst_ratings`), so
      a model that fails every row scores at least as badly as any predictor on the scale;
    - mae_fallback / rmse_fallback: a failure scored as its fallback rating (the figures before the headline
      changed; a model that always fails looks as good as the fallback predictor here);
    - mae_parsed_only: the well-formed answers alone; format_fail: the failure rate;
    - integer_share, the histogram `pred_hist/<r>` and `corr` (Pearson, labels vs predictions) of the parsed
      answers only (what the model itself said: nan with fewer than 2 parsed answers or no spread), so a
      collapse to one rating is visible."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(predictions, dtype=np.float64)
    failed = np.asarray(failed, dtype=bool)
    scored = scored_predictions(y, p, failed, scale)
    nan = float("nan")
    out = {"n": int(len(y)), "mae": float(np.mean(np.abs(y - scored))) if len(y) else nan,
           "rmse": float(np.sqrt(np.mean((y - scored) ** 2))) if len(y) else nan,
           "mae_fallback": float(np.mean(np.abs(y - p))) if len(y) else nan,
           "rmse_fallback": float(np.sqrt(np.mean((y - p) ** 2))) if len(y) else nan,
           "format_fail": float(failed.mean()) if len(y) else nan}
    ok = ~failed
    out["mae_parsed_only"] = float(np.mean(np.abs(y[ok] - p[ok]))) if ok.any() else nan
    out["integer_share"] = float(np.mean(p[ok] == np.round(p[ok]))) if ok.any() else nan
    yo, po = y[ok], p[ok]
    out["corr"] = float(np.corrcoef(yo, po)[0, 1]) if len(yo) > 1 and yo.std() > 0 and po.std() > 0 else nan
    lo, hi = int(scale[0]), int(scale[1])
    rounded = np.clip(np.round(p[ok]), lo, hi).astype(int)
    for r in range(lo, hi + 1):
        out[f"pred_hist/{r}"] = int((rounded == r).sum())
    return out


class LazyItems(Sequence):
    """A read-only list of items built on first access: rendering thousands of prompts up front (each
    fitted to the token budget by a few tokenizer calls) would delay the first step by minutes."""

    def __init__(self, examples: list[dict], make_item):
        self._examples = examples
        self._make_item = make_item
        self._built: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if index not in self._built:
            self._built[index] = self._make_item(self._examples[index])
        return self._built[index]


class RecTask:
    """Implements grpo.task.Task for rating prediction."""

    curve_keys = ["reward/format_ok", "reward/abs_error", "eval/mae", "eval/format_fail", "eval/copy_rate"]

    def __init__(self, cfg: TaskConfig, tokenizer):
        self.cfg = cfg  # its names and ranges were checked when it was built (TaskConfig.__post_init__)
        self.demonstrations = [get_template(cfg.template).one_shot_answer] if cfg.one_shot != "none" else []
        shown = cfg.copy_penalty > 0 and self.demonstrations
        self.demonstration_grams = ngrams(reasoning_text(self.demonstrations[0])) if shown else set()
        self.tokenizer = tokenizer
        self.data_dir = Path(cfg.data_dir)
        self.reward_fn = REWARDS[cfg.reward]
        self._cache: dict[str, list[dict]] = {}
        self._global_mean: float | None = None

    # -- data --------------------------------------------------------------------------------------------
    def examples(self, split: str) -> list[dict]:
        path = self.data_dir / f"{split}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: prepare the data first, e.g. "
                                    f"`python -m recdata.prepare --dataset amazon-music --out {self.data_dir}`")
        examples = read_examples(path)
        if split == "train" and self.cfg.max_train_examples > 0:
            examples = examples[: self.cfg.max_train_examples]
        return examples

    def _render_settings(self) -> dict:
        one_shot = {"none": False, "inline": True, "turn": "turn"}[self.cfg.one_shot]
        return {"template": self.cfg.template, "one_shot": one_shot,
                "max_prompt_tokens": self.cfg.max_prompt_tokens or None, "raw_chatml": self.cfg.raw_chatml}

    def prompt(self, example: dict) -> str:
        return render_prompt(example, self.tokenizer, **self._render_settings()) + self.cfg.prefill

    def shown(self, example: dict) -> dict:
        """The example cut to what its prompt shows (prompts.shown_example): the same token budget."""
        return shown_example(example, render_prompt_info(example, self.tokenizer, **self._render_settings()))

    def items(self, split: str) -> "LazyItems":
        """The split's items; each prompt is rendered (token budget and all) the first time it is used."""
        if split not in self._cache:
            self._cache[split] = LazyItems(self.examples(split), self.item)
        return self._cache[split]

    def item(self, example: dict) -> dict:
        eid = example.get("example_id") or f"{example['user_id']}|{example['item_id']}|{example['timestamp']}"
        return {"id": eid, "prompt": self.prompt(example), "example": example}

    # -- scoring -----------------------------------------------------------------------------------------
    def answer(self, completion: str) -> str:
        """The model's whole answer: the prefilled text is part of it."""
        return self.cfg.prefill + completion

    def scale(self, example: dict) -> tuple[float, float]:
        lo, hi = example.get("rating_scale", (1.0, 5.0))
        return float(lo), float(hi)

    def parse(self, example: dict, completion: str):
        lo, hi = self.scale(example)
        return parse_completion(self.answer(completion), template=self.cfg.template, rating_min=lo, rating_max=hi)

    def reward(self, item: dict, completion: str) -> tuple[float, dict[str, float]]:
        answer = self.answer(completion)
        copied = self.copies_demonstration(answer)
        # a copied demonstration is worth what an answer with no format at all is worth
        total, parts = self.reward_fn("" if copied else answer, item["example"], template=self.cfg.template)
        parts = {k: float(v) for k, v in parts.items()}
        if self.demonstration_grams:
            parts["copied"] = float(copied)
        return float(total), parts

    def copies_demonstration(self, answer: str) -> bool:
        """Whether the answer's reasoning shares more than `copy_penalty` of its 6-grams with the demonstration."""
        if not self.demonstration_grams:
            return False
        grams = ngrams(reasoning_text(answer))
        return bool(grams) and len(grams & self.demonstration_grams) / len(grams) > self.cfg.copy_penalty

    def fallback_rating(self, example: dict) -> float:
        if self.cfg.fallback == "user_avg":
            return float(example["user_avg_rating"])
        if self.cfg.fallback == "item_avg":
            return float(example["item_avg_rating"])
        if self._global_mean is None:
            self._global_mean = float(np.mean([ex["rating"] for ex in self.examples("train")]))
        return self._global_mean

    def predictions(self, items: list[dict], completions: list[str]) -> list[dict]:
        """Per item: the parsed rating (or None), the prediction used for scoring, and the label."""
        rows = []
        for item, completion in zip(items, completions):
            ex = item["example"]
            parsed = self.parse(ex, completion)
            # Only a strictly well-formed answer counts; a failure is scored with the fallback, never as right.
            ok = parsed.format_ok and parsed.rating is not None
            rows.append({"rating": parsed.rating if ok else None, "format_ok": bool(parsed.format_ok),
                         "error": parsed.error, "prediction": parsed.rating if ok else self.fallback_rating(ex),
                         "label": float(ex["rating"])})
        return rows

    def evaluate(self, items: list[dict], completions: list[str]) -> dict[str, float]:
        """Strict rating metrics and the copy rate (experiments/copying.py) of a set of greedy answers."""
        rows = self.predictions(items, completions)
        scale = self.scale(items[0]["example"]) if items else (1.0, 5.0)
        metrics = rating_metrics([r["label"] for r in rows], [r["prediction"] for r in rows],
                                 [r["rating"] is None for r in rows], scale)
        metrics["copy_rate"] = copy_rate([self.answer(c) for c in completions], self.demonstrations)["copy_rate"]
        return metrics

    def describe(self, item: dict, completion: str) -> dict:
        parsed = self.parse(item["example"], completion)
        return {"label": float(item["example"]["rating"]), "parsed_rating": parsed.rating,
                "format_ok": parsed.format_ok, "parse_error": parsed.error}

