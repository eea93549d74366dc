"""Supervised fine-tuning (SFT) on reasoning traces: the warm start before GRPO (issue 4, "RecOne").

The model is trained to reproduce target completions (e.g. a reasoning trace ending in `<rate>4</rate>`)
by maximum likelihood: the loss is the negative mean log-probability of the completion tokens. Prompt tokens
carry no loss by construction: `grpo.logprobs.completion_logprobs` (the same scorer the GRPO update uses)
only returns log-probs of completion tokens, so the two trainers cannot disagree about what a token's
log-prob is. One optimizer step of this file:

    1. take `batch_size` (prompt, completion) pairs   (data order fixed by the seed)
    2. micro-batches: forward, -sum(logp * mask) / (completion tokens of the whole step), backward
    3. gradient clipping, AdamW, linear warm-up then constant learning rate
    4. log; every `eval_every` steps: validation loss (+ the task's greedy metrics); keep the best
       checkpoint by validation loss; stop early after `patience` evaluations without improvement

Ctrl-C / SIGTERM (or every `run.save_every` steps) writes a step checkpoint with the optimizer and the
early-stopping record, and `run.resume=latest` continues from it, as in GRPO (grpo/train.py).

Shapes: n rows in a micro-batch, P prompt length (left-padded), T completion length (right-padded).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grpo import distributed
from grpo.batching import batch_indices
from grpo.checkpoint import prune_checkpoints, resume_run, save_checkpoint
from grpo.config import ModelConfig, RunConfig, SamplingConfig, check, save_config
from grpo.logprobs import completion_logprobs, completion_logprobs_fast
from grpo.interrupt import StopOnSignal
from grpo.policy import Policy, load_policy, make_optimizer
from grpo.rollout import encode_prompts, evaluate
from grpo.runlog import RunLog, RunRecord, claim_run_folder, write_json
from grpo.sampler import left_pad
from grpo.task import Task


@dataclass
class SFTConfig:
    epochs: int = 3
    """Passes over the training pairs (used when max_steps is 0)."""
    max_steps: int = 0
    """Optimizer steps; 0 = epochs * ceil(pairs / batch_size)."""
    batch_size: int = 8
    """Sequences (prompt, completion pairs) per optimizer step."""
    micro_batch_size: int = 4
    """Sequences per forward/backward; gradients accumulate with one global token denominator."""
    lr: float = 1e-5
    """AdamW learning rate after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many steps, then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    patience: int = 0
    """Stop after this many evaluations in a row without a lower validation loss; 0 = never stop early."""
    max_completion_tokens: int = 1024
    """Longer targets are cut to this many tokens (and then get no EOS: a cut trace is not a finished one)."""
    logprobs: str = "fast"
    """How the log-probs are computed: `reference` = grpo.logprobs.completion_logprobs, one forward over every
    padded prompt and completion; `fast` = the same numbers with the prompts' common prefix (a template's system
    message and worked example) run once per micro-batch and padding columns trimmed (completion_logprobs_fast)."""

    def __post_init__(self):
        check("sft", epochs=(self.epochs >= 1, f"must be >= 1, got {self.epochs}"),
              max_steps=(self.max_steps >= 0, f"must be >= 0 (0 = epochs), got {self.max_steps}"),
              batch_size=(self.batch_size >= 1, f"must be >= 1, got {self.batch_size}"),
              micro_batch_size=(self.micro_batch_size >= 1, f"must be >= 1, got {self.micro_batch_size}"),
              lr=(self.lr >= 0, f"must be >= 0, got {self.lr}"),
              warmup_steps=(self.warmup_steps >= 0, f"must be >= 0, got {self.warmup_steps}"),
              max_grad_norm=(self.max_grad_norm >= 0, f"must be >= 0, got {self.max_grad_norm}"),
              patience=(self.patience >= 0, f"must be >= 0, got {self.patience}"),
              max_completion_tokens=(self.max_completion_tokens >= 1,
                                     f"must be >= 1, got {self.max_completion_tokens}"),
              logprobs=(self.logprobs in ("reference", "fast"), f"must be reference or fast, got {self.logprobs!r}"))


# ----------------------------------------------------------------------------------------------------
# Data: (prompt, completion) texts -> token ids -> padded batches
# ----------------------------------------------------------------------------------------------------
@dataclass
class SFTExample:
    prompt_ids: list[int]
    completion_ids: list[int]  # the target tokens, EOS included unless the target was cut


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], eos_id: int, max_completion_tokens: int) -> list[SFTExample]:
    """Token ids of each pair. The completion gets the EOS id appended so the model learns to stop."""
    prompt_ids = encode_prompts(tokenizer, [p for p, _ in pairs])
    examples = []
    for prompt, (_, completion) in zip(prompt_ids, pairs):
        target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos_id]
        examples.append(SFTExample(prompt, target[:max_completion_tokens]))
    return examples


def right_pad(token_lists: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ragged token lists: (ids (n, T), mask (n, T)). The mask comes from the lengths, never from
    the pad id (pad == EOS for SmolLM2: a mask from the pad id would drop the EOS the model must learn)."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)  # (n, T)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)  # (n, T)
    for row, tokens in enumerate(token_lists):
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, :len(tokens)] = 1
    return ids.to(device), mask.to(device)


def collate(examples: list[SFTExample], pad_id: int, device=None):
    """(prompt_ids (n, P), prompt_mask (n, P), completion_ids (n, T), completion_mask (n, T))."""
    prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in examples], pad_id, device)  # (n, P), (n, P)
    completion_ids, completion_mask = right_pad([e.completion_ids for e in examples], pad_id, device)  # (n, T) x2
    return prompt_ids, prompt_mask, completion_ids, completion_mask


# ----------------------------------------------------------------------------------------------------
# The loss: tensors in, a number out
# ----------------------------------------------------------------------------------------------------
def sft_loss(logp: torch.Tensor, completion_mask: torch.Tensor, total_tokens: float) -> torch.Tensor:
    """-sum(logp over kept tokens) / total_tokens. With `total_tokens` = the kept tokens of the whole
    optimizer step, the micro-batch losses add up to the step's per-token mean NLL, whatever the split."""
    assert logp.shape == completion_mask.shape, (logp.shape, completion_mask.shape)
    return -(logp * completion_mask.to(logp.dtype)).sum() / max(float(total_tokens), 1.0)


def batch_logprobs(policy: Policy, batch, chunk_tokens: int = 1024, logprobs: str = "fast") -> torch.Tensor:
    """log p of each completion token of a collated batch (n, T), by the scorer `SFTConfig.logprobs` names."""
    scorer, options = ((completion_logprobs, {}) if logprobs == "reference" else
                       (completion_logprobs_fast, {"shared_prefix": True}))
    with policy.autocast():
        return distributed.call(scorer, policy.model, *batch, chunk_tokens=chunk_tokens, **options)  # (n, T)


def accumulate_sft_gradients(policy: Policy, examples: list[SFTExample], micro_batch_size: int,
                             chunk_tokens: int = 1024, total_tokens: int | None = None,
                             logprobs: str = "fast") -> tuple[float, int]:
    """Backward the SFT loss of one optimizer step's examples, a micro-batch at a time. `total_tokens`: the
    completion tokens of the whole step (under torchrun, of every rank's examples); default: these.
    Returns (this call's share of the step's mean NLL per completion token, the token count)."""
    if total_tokens is None:
        total_tokens = sum(len(e.completion_ids) for e in examples)
    loss_sum = 0.0
    for start in range(0, len(examples), micro_batch_size):
        batch = collate(examples[start:start + micro_batch_size], policy.pad_id, policy.device)
        logp = batch_logprobs(policy, batch, chunk_tokens, logprobs)  # (n, T)
        loss = sft_loss(logp, batch[3], total_tokens)
        loss.backward()  # gradients accumulate in .grad across micro-batches
        loss_sum += float(loss.detach())
    return loss_sum, total_tokens


@torch.no_grad()
def validation_loss(policy: Policy, examples: list[SFTExample], batch_size: int, chunk_tokens: int = 1024,
                    logprobs: str = "fast") -> float:
    """Mean NLL per completion token over all `examples` (token-weighted, like the training loss). Under
    torchrun every rank scores all of them: each forward of a sharded model is collective, and the
    validation pairs are few."""
    policy.model.eval()
    nll, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], policy.pad_id, policy.device)
        logp = batch_logprobs(policy, batch, chunk_tokens, logprobs)  # (n, T)
        nll += float(sft_loss(logp, batch[3], 1.0))  # a sum: denominator 1
        tokens += int(batch[3].sum())
    return nll / max(tokens, 1)


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
@dataclass
class _SFTEngineConfig:
    model: ModelConfig
    sft: SFTConfig
    run: RunConfig


def train_sft(model_cfg: ModelConfig, cfg: SFTConfig, run: RunConfig, train_pairs: list[tuple[str, str]],
              val_pairs: list[tuple[str, str]], sampling: SamplingConfig | None = None, task: Task | None = None,
              val_items: list[dict] | None = None, full_config=None) -> Path:
    """Fine-tune on (prompt, completion) pairs; returns the run folder. Writes metrics.jsonl, eval.json,
    checkpoints/best (lowest validation loss) and checkpoints/step_N (the last step). With a `task` and
    `val_items`, every evaluation also decodes those prompts greedily and logs the task's metrics."""
    if not train_pairs:
        raise ValueError("no training pairs")
    dist = distributed.setup()  # world size 1 without torchrun
    mine = distributed.rank_share(cfg.batch_size, dist, "sft.batch_size")  # this rank's pairs of each step
    run_dir = Path(run.output_dir or f"runs/{run.name}")
    claim_run_folder(run_dir, run.resume, run.overwrite, delete=dist.is_main)  # before anything is written
    dist.barrier()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(full_config if full_config is not None else _SFTEngineConfig(model_cfg, cfg, run),
                    run_dir / "config.yaml")
    record = RunRecord(run_dir, resumed=bool(run.resume)) if dist.is_main else None  # run.json: command, wall time
    torch.manual_seed(run.seed)
    random.seed(run.seed)

    # ---- model, data, optimizer ------------------------------------------------------------------------
    policy = load_policy(model_cfg, seed=run.seed, dist=dist)
    model = policy.model
    eos_id = policy.tokenizer.eos_token_id
    train_examples = encode_pairs(policy.tokenizer, train_pairs, eos_id, cfg.max_completion_tokens)
    val_examples = encode_pairs(policy.tokenizer, val_pairs, eos_id, cfg.max_completion_tokens)
    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    eval_every = run.eval_every if run.eval_every > 0 else steps_per_epoch  # SFT: 0 = at each epoch's end

    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.warmup_steps)
    sampling = sampling or SamplingConfig()
    val_items = val_items if task is not None else None
    log = RunLog(run_dir, ["sft/loss", "eval/loss", *(task.curve_keys if task is not None else [])],
                 tensorboard=run.tensorboard, plot=run.plot, enabled=dist.is_main)
    start_step, loop_state = resume_run(run.resume, run_dir, policy, optimizer, scheduler, log)

    # ---- evaluation: validation loss, task metrics, best checkpoint, early-stopping bookkeeping ------------
    # `best` travels in step checkpoints; a best checkpoint written after the one resumed from is written
    # again when the resumed run repeats that evaluation (same data order, same random state).
    best = {"loss": math.inf, "step": None, "evals_without_improvement": 0, **loop_state.get("best", {})}

    def run_eval(step: int) -> dict:
        metrics = {}
        if val_examples:
            metrics["eval/loss"] = validation_loss(policy, val_examples, run.eval_batch_size, logprobs=cfg.logprobs)
            if metrics["eval/loss"] < best["loss"]:
                best.update(loss=metrics["eval/loss"], step=step, evals_without_improvement=0)
                save_checkpoint(run_dir / "checkpoints" / "best", policy, dist=dist, lora_cfg=model_cfg.lora)
            else:
                best["evals_without_improvement"] += 1
        if val_items:
            metrics.update({f"eval/{k}": v for k, v in
                            evaluate(policy, task, val_items, sampling, run.eval_batch_size).items()})
        if metrics:
            log.log(step, metrics)
        return metrics

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir / "checkpoints" / f"step_{step}", policy, optimizer, scheduler, step, dist,
                        model_cfg.lora, loop_state={"best": best})
        if dist.is_main:
            prune_checkpoints(run_dir, max(run.keep_checkpoints, 1))

    fresh = start_step == 0 and run.eval_at_start
    last_eval = run_eval(0) if fresh else {}
    last_eval_step = 0 if fresh else None
    stopped_early = stopping = False

    bar = tqdm(desc="sft", initial=start_step, total=total_steps, disable=not dist.is_main)
    step = start_step
    with StopOnSignal() as stop:  # Ctrl-C / SIGTERM: finish the step, checkpoint, return (grpo/interrupt.py)
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.perf_counter()

            # ---- 1. this step's pairs: positions of the endless, per-epoch shuffled stream ----------------
            order = batch_indices(len(train_examples), cfg.batch_size, step - 1, run.seed)
            batch = [train_examples[i] for i in order]
            tokens = sum(len(e.completion_ids) for e in batch)  # the whole step's, before this rank's share
            batch = batch[mine]

            # ---- 2. gradients of the mean NLL of the step's completion tokens ---------------------------------
            model.train()
            loss, _ = accumulate_sft_gradients(policy, batch, cfg.micro_batch_size, total_tokens=tokens,
                                               logprobs=cfg.logprobs)
            loss = dist.all_sum(loss)

            # ---- 3. clip, step --------------------------------------------------------------------------
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            lr = scheduler.get_last_lr()[0]  # the rate this update used
            if not (math.isfinite(loss) and math.isfinite(float(distributed.full_tensor(grad_norm)))):
                raise FloatingPointError(f"step {step}: the loss or gradient norm is not finite (sft.lr={cfg.lr:g} "
                                         "is the usual cause); nothing was applied")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            policy.weights_changed()
            scheduler.step()

            # ---- 4. log, evaluate, stop early or on request ---------------------------------------------
            log.log(step, {"sft/loss": loss, "sft/tokens": tokens, "lr": lr, "time/step_s": time.perf_counter() - t0,
                           "grad/norm": float(distributed.full_tensor(grad_norm))})
            bar.update(1)
            bar.set_postfix({"loss": f"{loss:.3f}", **({"val": f"{last_eval['eval/loss']:.3f}"}
                                                       if "eval/loss" in last_eval else {})})
            if step % eval_every == 0 or step == total_steps:
                last_eval, last_eval_step = run_eval(step), step
                log.plot()
                if cfg.patience > 0 and best["evals_without_improvement"] >= cfg.patience:
                    stopped_early = True
                    log.print(f"early stop at step {step}: validation loss has not improved on {best['loss']:.4f} "
                              f"(step {best['step']}) for {cfg.patience} evaluations")
                    break
            stopping = step < total_steps and dist.all_max(stop.requested) > 0  # every rank stops together
            if stopping or (run.save_every > 0 and step % run.save_every == 0 and step < total_steps):
                checkpoint(step)
            if stopping:
                log.print(f"stopped on request after step {step}: continue with run.resume=latest")
                break
    bar.close()
    if stopping:
        log.close()
        return run_dir

    # ---- the end: final evaluation (if the last step had none), checkpoint, summary -------------------------
    if last_eval_step != step:
        last_eval = run_eval(step)
    checkpoint(step)
    if dist.is_main:
        write_json(run_dir / "eval.json", {"step": step, **last_eval, "best_step": best["step"],
                                           "best_eval_loss": best["loss"], "stopped_early": stopped_early})
        record.finish(steps=step)
    log.plot()
    log.close()
    return run_dir
