"""Cold-start reasoning traces for RecOne: `python -m experiments.coldstart --config experiments/configs/recone.yaml`.

Three teachers write answers in the four-tag format for training examples; only traces that parse under the
strict format rule and whose rating is within `tolerance` of the label are kept (docs/paper.md, RecOne):
- `teacher: rules` (no model, no network): each trace states the example's own facts (the user's liked and
  disliked titles, the item's reviews and averages) and rates by the bias rule (experiments/rule_teacher.py).
- `teacher: self` (default, no network; the paper's open question 1): the current model samples
  `samples_per_example` answers per example; the kept answer is the one closest to the label. Bias
  correction: when none is close enough, the model is asked again with the true rating given.
- `teacher: openai`: any OpenAI-compatible chat endpoint (DeepSeek-R1 in the paper), see experiments/teacher.py.
Answers that copy the prompt's worked example (a small model's favourite shortcut) are rejected too.
Writes one JSON line per example to `coldstart.out` and prints how many traces survived each stage.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.config import ExperimentConfig, config_from_cli
from experiments.copying import ngrams
from experiments.rule_teacher import rule_trace
from experiments.task import RecTask
from experiments.teacher import TeacherConfig, check_trace, example_id, generate_traces
from grpo.sft import SFTConfig
from grpo.scaffold import Scaffold
from grpo.models import load_tokenizer
from grpo.policy import load_policy
from grpo.rollout import decode_completions, generate
from prompts import TEMPLATES, parse_completion


@dataclass
class ColdStartConfig:
    teacher: str = "self"
    """self (the model writes its own traces), rules (traces written from each example's data,
    experiments/rule_teacher.py) or openai (an OpenAI-compatible endpoint, see `teacher`)."""
    out: str = "runs/recone/coldstart.jsonl"
    """The traces file (one line per example; reused and resumed if it exists)."""
    n_examples: int = 64
    """How many training examples to write traces for (the paper used ~1,000)."""
    spread: bool = False
    """Draw the n_examples at random from the whole training split (seeded by run.seed) instead of taking the
    first n: a prepared split lists each item's reviews together, so its first rows cover few items."""
    samples_per_example: int = 4
    """Self-teacher: answers sampled per example (the best one is kept)."""
    batch_examples: int = 4
    """Self-teacher: examples per sampling batch."""
    tolerance: float = 0.0
    """Keep a trace only if |rating - label| <= tolerance."""
    quotes: bool = True
    """Rule teacher: quote the summaries of the item's best and worst earlier reviews (True) or state only
    their ratings (False; experiments/rule_teacher.py)."""
    shrink: float = 0.0
    """Rule teacher: ratings at the training mean added to the user's and the item's average before the
    bias rule (0: the plain averages; experiments/rule_teacher.py)."""
    stepwise: bool = False
    """Rule teacher: write the rating's arithmetic as two one-operation steps (the user's offset from the
    usual rating, then the item's mean plus that offset) instead of one three-term sum."""
    style: str = "counts"
    """Rule teacher: what the traces state, "counts" (rating and review counts, ranges, genre lists) or
    "titles" (titles and quoted review summaries, the user's entry closest to the item; fewer shared phrases
    for a student to copy); experiments/rule_teacher.py."""
    from_prompt: bool = False
    """Rule teacher: write each trace from what the example's prompt shows rather than from the whole example,
    so that it never states a title or a quote the student cannot see (the token budget drops the oldest
    entries and cuts long texts: with max_prompt_tokens 1024, 53 of the first 60 music validation prompts
    lose user entries and all 60 lose item reviews). False, the first behaviour, for the runs recorded
    before it existed."""
    say_cap: bool = False
    """Rule teacher: write "capped at 5" rather than "about 5" when the bias rule's sum rounds above the
    scale (and "capped at 1" below it); a student taught only "about" wrote "about 6" for such sums. False,
    the first behaviour, for the runs recorded before it existed."""
    tenths: bool = False
    """Rule teacher: rate to a tenth of a star, the bias rule's sum as written ("4.2 + 4.9 - 4.5 = 4.6" rates
    4.6), kept on the scale with say_cap's wording, rather than rounded to a whole star: a mean-squared
    error rewards a 4.6 where it is unsure between 4 and 5."""
    item_first: bool = False
    """Rule teacher: write the one-sum arithmetic item mean first ("4.4 + 5 - 4.5 = 4.9"), whose whole stars
    the sum mostly keeps; user first ("5 + 4.4 - 4.5") led a student to copy the user's 5 into the sum
    ("= 5.9, about 6", an answer off the scale, on 11% of validation rows)."""
    bias_correction: bool = True
    """Ask again with the true rating given when no answer had the right rating."""
    max_copy_overlap: float = 0.3
    """Reject an answer sharing more than this share of the worked example's word 6-grams (copying)."""
    scaffold: bool = True
    """Self-teacher: the decoder writes the section tags and the model writes what is inside each (a small
    model rarely keeps the four-tag format by itself); False samples free text like GRPO does."""
    section_tokens: list[int] = field(default_factory=lambda: [48, 48, 40, 1])
    """Self-teacher with scaffold: the most tokens the model may write inside each section, in order (the
    last, the rating, is one digit 1-5 drawn from the model's own distribution over the five digits)."""
    min_words: int = 4
    """Reject an answer with a reasoning section of fewer words than this (empty or one-word thinking)."""


@dataclass
class ReconeConfig(ExperimentConfig):
    coldstart: ColdStartConfig = field(default_factory=ColdStartConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


def copy_overlap(answer: str, demonstration: str, n: int = 6) -> float:
    """Share of the demonstration's word n-grams (experiments/copying.py) that reappear in the answer (0 = none,
    1 = a full copy)."""
    demo = ngrams(demonstration, n)
    return len(demo & ngrams(answer, n)) / len(demo) if demo else 0.0


def _hint_prompt(task: RecTask, example: dict) -> str:
    """The task prompt with the true rating revealed after the closing line of the last user turn."""
    label = float(example["rating"])
    note = (f"\n(For this user the true rating is {label:g}. Write the four steps so that the analysis "
            f"explains this rating, and end with <rate> {label:g} </rate>.)")
    text = task.prompt(example)
    closing = TEMPLATES[task.cfg.template].closing
    at = text.rfind(closing)
    if at < 0:
        raise ValueError("the prompt's closing line was not found; cannot add the rating hint")
    return text[:at + len(closing)] + note + text[at + len(closing):]


def self_traces(cfg: ReconeConfig, examples: list[dict], out: Path) -> dict:
    """The model writes its own traces. One line per example in `out`; already written examples are skipped."""
    policy = load_policy(cfg.model, seed=cfg.run.seed, for_training=False)
    task = RecTask(cfg.task, policy.tokenizer)
    demo = TEMPLATES[cfg.task.template].one_shot_answer
    done = set()
    if out.exists():
        done = {json.loads(line)["example_id"] for line in out.read_text(encoding="utf-8").splitlines() if line.strip()}
    todo = [ex for ex in examples if example_id(ex) not in done]
    stats = {"requested": len(examples), "skipped": len(examples) - len(todo), "first_kept": 0, "corrected_kept": 0,
             "rejected_format": 0, "rejected_rating": 0, "rejected_copy": 0, "rejected_thin": 0}
    generator = torch.Generator(device=policy.device).manual_seed(cfg.run.seed)
    G, cs = cfg.coldstart.samples_per_example, cfg.coldstart

    tmpl = TEMPLATES[cfg.task.template]
    scaffold = None
    if cs.scaffold:
        if not cfg.task.prefill.strip().startswith(f"<{tmpl.sections[0]}>"):
            raise ValueError(f"coldstart.scaffold needs task.prefill to open the first section "
                             f"(e.g. '<{tmpl.sections[0]}>\\n'), got {cfg.task.prefill!r}")
        if len(cs.section_tokens) != len(tmpl.sections):
            raise ValueError(f"coldstart.section_tokens needs {len(tmpl.sections)} numbers (one per section of "
                             f"the {cfg.task.template} template), got {cs.section_tokens}")
        # the answer section may only hold the rating's digits (whole stars: the labels' own scale)
        digits = [policy.tokenizer(str(d), add_special_tokens=False)["input_ids"] for d in range(1, 6)]
        if any(len(ids) != 1 for ids in digits):
            raise ValueError("coldstart.scaffold needs a tokenizer with one token per digit 1-5")
        allowed = [None] * (len(tmpl.sections) - 1) + [[ids[0] for ids in digits]]
        scaffold = Scaffold(policy.tokenizer, [(f"<{name}>", f"</{name}>") for name in tmpl.sections],
                            cs.section_tokens, allowed=allowed)
    sampling = cfg.sampling
    if scaffold is not None:  # room for every section's body and its tags
        sampling = dataclasses.replace(sampling, max_new_tokens=sum(cs.section_tokens) + 16 * len(tmpl.sections))

    def thin_section(text: str) -> bool:
        parsed = parse_completion(text, template=cfg.task.template)
        return any(len((parsed.sections.get(name) or "").split()) < cs.min_words
                   for name in tmpl.reasoning_sections)

    def best_answer(prompts: list[str], batch: list[dict]) -> list[tuple[str | None, str]]:
        rollout = generate(policy, prompts, sampling, group_size=G, generator=generator, scaffold=scaffold)
        texts = [task.answer(t) for t in decode_completions(policy.tokenizer, rollout)]
        results = []
        for b, ex in enumerate(batch):
            best, reason, best_err = None, "format", None
            for text in texts[b * G:(b + 1) * G]:
                keep, why, rating = check_trace(text, ex, tolerance=float("inf"), template=cfg.task.template)
                if not keep:
                    continue
                if thin_section(text):
                    reason = "thin" if reason == "format" else reason
                    continue
                if copy_overlap(text, demo) > cs.max_copy_overlap:
                    reason = "copy" if reason == "format" else reason
                    continue
                err = abs(rating - float(ex["rating"]))
                reason = "rating" if err > cs.tolerance else reason
                if err <= cs.tolerance and (best_err is None or err < best_err):
                    best, best_err = text, err
            results.append((best, "ok" if best is not None else reason))
        return results

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for start in tqdm(range(0, len(todo), cs.batch_examples), desc="coldstart"):
            batch = todo[start:start + cs.batch_examples]
            first = best_answer([task.prompt(ex) for ex in batch], batch)
            retry = [b for b, (text, why) in enumerate(first) if text is None and why == "rating"]
            second = {}
            if cs.bias_correction and retry:
                answers = best_answer([_hint_prompt(task, batch[b]) for b in retry], [batch[b] for b in retry])
                second = dict(zip(retry, answers))
            for b, ex in enumerate(batch):
                text, why = first[b]
                stage = "first"
                if text is None and b in second and second[b][0] is not None:
                    text, why, stage = second[b][0], "ok", "corrected"
                kept = text is not None
                if kept:
                    stats["first_kept" if stage == "first" else "corrected_kept"] += 1
                else:
                    stats[f"rejected_{why}"] += 1
                # The SFT pair: the ordinary training prompt (never the hinted one) and the answer after any prefill.
                completion = text[len(cfg.task.prefill):] if kept and text.startswith(cfg.task.prefill) else text
                f.write(json.dumps({"example_id": example_id(ex), "prompt": task.prompt(ex), "completion": completion,
                                    "label": float(ex["rating"]), "kept": kept, "stage": stage if kept else "rejected",
                                    "reason": why, "source": "self"}, ensure_ascii=False) + "\n")
                f.flush()
    stats["kept"] = stats["first_kept"] + stats["corrected_kept"]
    return stats


def rule_teacher(cfg: ReconeConfig):
    """example -> its rule trace with the run's coldstart settings (experiments/rule_teacher.py); the usual
    rating the rule subtracts is the mean of the training split's labels. With `coldstart.from_prompt` the
    trace is written from the example as its prompt shows it (the model's tokenizer counts the budget)."""
    c = cfg.coldstart
    task = RecTask(cfg.task, tokenizer=load_tokenizer(cfg.model.name_or_path) if c.from_prompt else None)
    train = task.examples("train")
    global_mean = sum(float(ex["rating"]) for ex in train) / len(train)
    view = task.shown if c.from_prompt else (lambda ex: ex)
    return lambda ex: rule_trace(view(ex), global_mean, quotes=c.quotes, shrink=c.shrink, stepwise=c.stepwise,
                                 style=c.style, say_cap=c.say_cap, tenths=c.tenths,
                                 item_first=c.item_first)


def rule_traces(cfg: ReconeConfig, examples: list[dict], out: Path) -> dict:
    """Traces written by rule from each example's data (experiments/rule_teacher.py); the file is rewritten."""
    teacher = rule_teacher(cfg)
    stats = {"requested": len(examples), "kept": 0, "rejected_rating": 0, "rejected_format": 0}
    prefill = cfg.task.prefill
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for ex in examples:
            text = teacher(ex)
            kept, why, _ = check_trace(text, ex, tolerance=cfg.coldstart.tolerance, template=cfg.task.template)
            stats["kept" if kept else f"rejected_{why.split(':')[0].replace('wrong_', '')}"] += 1
            completion = text[len(prefill):] if text.startswith(prefill) else text
            f.write(json.dumps({"example_id": example_id(ex), "prompt": None, "completion": completion,
                                "label": float(ex["rating"]), "kept": kept, "stage": "first" if kept else "rejected",
                                "reason": why, "source": "rules"}, ensure_ascii=False) + "\n")
    return stats


def write_traces(cfg: ReconeConfig) -> tuple[Path, dict]:
    out = Path(cfg.coldstart.out)
    task_examples = RecTask(cfg.task, tokenizer=None).examples("train")
    if cfg.coldstart.spread:
        picked = sorted(random.Random(cfg.run.seed).sample(range(len(task_examples)),
                                                           min(cfg.coldstart.n_examples, len(task_examples))))
        task_examples = [task_examples[i] for i in picked]
    else:
        task_examples = task_examples[: cfg.coldstart.n_examples]
    if cfg.coldstart.teacher == "self":
        stats = self_traces(cfg, task_examples, out)
    elif cfg.coldstart.teacher == "rules":
        stats = rule_traces(cfg, task_examples, out)
    elif cfg.coldstart.teacher == "openai":
        teacher = TeacherConfig(**{**cfg.teacher.__dict__, "tolerance": cfg.coldstart.tolerance,
                                   "bias_correction": cfg.coldstart.bias_correction})
        stats = generate_traces(task_examples, teacher, out, template=cfg.task.template)
    else:
        raise ValueError(f"coldstart.teacher must be self, rules or openai, got {cfg.coldstart.teacher!r}")
    print("cold-start traces:", json.dumps(stats))
    return out, stats


def sft_pairs(traces_path: Path, task: RecTask) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of the kept traces, with the task's own prompt for each example."""
    by_id = {example_id(ex): ex for ex in task.examples("train")}
    pairs = []
    for line in traces_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else None
        if not record or not record.get("kept"):
            continue
        prompt = record.get("prompt") or task.prompt(by_id[record["example_id"]])
        completion = record["completion"]
        if task.cfg.prefill and completion.startswith(task.cfg.prefill):
            completion = completion[len(task.cfg.prefill):]
        pairs.append((prompt, completion))
    return pairs


def main(argv=None) -> int:
    cfg = config_from_cli(ReconeConfig, argv, __doc__, default_config="experiments/configs/recone.yaml")
    if cfg is None:
        return 2
    write_traces(cfg)
    return 0

if __name__ == "__main__":
    sys.exit(main())
