"""The GRPO loop, once, top to bottom.

GRPO (DeepSeekMath, Shao et al. 2024) is PPO without a value network: for each prompt we sample a
*group* of G completions, score them with a reward function, and use each completion's reward relative
to its group as the advantage of every one of its tokens. One step of this file:

    1. sample B prompts                         (data order fixed by the seed: resumable)
    2. generate G completions each              (grpo/rollout.py; the plain loop is grpo/sampler.py)
    3. score them                               (the task's reward function; the engine never reads text)
    4. group-normalised advantages              (grpo.functional.group_advantages)
    5. the loss mask; old log-probs (mu > 1) and reference log-probs (beta > 0)
    6. mu policy updates: micro-batches, clipped surrogate (+ beta * KL), one normaliser for the whole step,
       gradient clipping, AdamW
    7. log metrics and samples; evaluate; checkpoint

Shapes: B prompts per step, G completions per prompt, N = B*G rows, P prompt length, T completion length.
Everything tunable is in grpo.config (ModelConfig, SamplingConfig, GRPOConfig, RunConfig); docs/grpo.md
explains the objective and the numbered traps the comments cite.
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
from grpo.batching import batch_indices, plan_micro_batches
from grpo.checkpoint import prune_checkpoints, resume_run, save_checkpoint
from grpo.config import GRPOConfig, ModelConfig, RunConfig, SamplingConfig, save_config
from grpo.functional import group_advantages, grpo_loss, mask_truncated
from grpo.interrupt import StopOnSignal
from grpo.lora import adapters_disabled
from grpo.logprobs import completion_logprobs, completion_logprobs_fast
from grpo.metrics import step_metrics
from grpo.policy import load_policy, make_optimizer
from grpo.rollout import decode_completions, evaluate, generate
from grpo.runlog import RunLog, RunRecord, claim_run_folder, write_json
from grpo.task import Task


def train(model_cfg: ModelConfig, sampling: SamplingConfig, cfg: GRPOConfig, run: RunConfig, task: Task,
          full_config=None) -> Path:
    """Train with GRPO; returns the run folder. `full_config` (any dataclass) is saved as config.yaml.
    Under torchrun every rank runs this same function on its share of each step (grpo.distributed)."""
    dist = distributed.setup()  # world size 1 without torchrun
    mine = distributed.rank_share(cfg.batch_prompts, dist, "grpo.batch_prompts")  # this rank's share of B prompts
    run_dir = Path(run.output_dir or f"runs/{run.name}")
    train_items = task.items("train")  # the inputs are read, and the folder checked, before anything is written
    val_items = task.items("val")[: run.eval_examples] if run.eval_examples > 0 else []
    if len(train_items) == 0:
        raise ValueError("the task has no training items")
    claim_run_folder(run_dir, run.resume, run.overwrite, delete=dist.is_main)
    torch.manual_seed(run.seed)
    random.seed(run.seed)

    # ---- the policy, the optional frozen reference, the optimizer -------------------------------------
    # With beta = 0 the KL term vanishes: loading a reference model would only cost memory (trap 9).
    policy = load_policy(model_cfg, seed=run.seed, dist=dist, with_reference=cfg.beta > 0)
    model = policy.model
    dist.barrier()
    if dist.is_main:  # rank 0 alone writes the run folder, once the inputs and the model have loaded
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(full_config or _EngineConfig(model_cfg, sampling, cfg, run), run_dir / "config.yaml")
    record = RunRecord(run_dir, resumed=bool(run.resume)) if dist.is_main else None  # run.json: command, wall time
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.adam_betas)
    generator = torch.Generator(device=policy.device)
    B, G = cfg.batch_prompts, cfg.group_size
    loss_settings = dict(clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high, beta=cfg.beta,
                         kl_clamp=cfg.kl_clamp, loss_agg=cfg.loss_agg, max_completion_len=sampling.max_new_tokens)

    log = RunLog(run_dir, ["reward/mean", *task.curve_keys], tensorboard=run.tensorboard, plot=run.plot,
                 enabled=dist.is_main)
    start_step, _ = resume_run(run.resume, run_dir, policy, optimizer, scheduler, log)

    def run_eval(step: int) -> dict:
        metrics = {f"eval/{k}": v for k, v in evaluate(policy, task, val_items, sampling, run.eval_batch_size).items()}
        log.log(step, metrics)
        return metrics

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir / "checkpoints" / f"step_{step}", policy, optimizer, scheduler, step, dist,
                        model_cfg.lora)
        if dist.is_main:
            prune_checkpoints(run_dir, run.keep_checkpoints)

    last_eval, nonfinite_in_a_row, collapse_warned = {}, 0, False
    if start_step == 0 and run.eval_at_start and val_items:
        last_eval = run_eval(0)

    # steps count from 1 (as in SFT): step s is the s-th update, logged and checkpointed as s
    bar = tqdm(range(start_step + 1, cfg.steps + 1), desc="grpo", initial=start_step, total=cfg.steps,
               disable=not dist.is_main)
    stopping = False
    with StopOnSignal() as stop:  # Ctrl-C / SIGTERM: finish the step, checkpoint, return (grpo/interrupt.py)
        for step in bar:
            metrics: dict[str, float] = {}

            # ---- 1. a batch of B prompts (under torchrun: this rank's share of them) -------------------------
            batch = [train_items[i] for i in batch_indices(len(train_items), B, step - 1, run.seed)][mine]

            # ---- 2. G completions per prompt ------------------------------------------------------------------
            t0 = time.perf_counter()
            generator.manual_seed(distributed.step_seed(run.seed, step - 1, dist.rank))
            rollout = generate(policy, [it["prompt"] for it in batch], sampling, group_size=G, generator=generator)
            completions = decode_completions(policy.tokenizer, rollout)  # N texts, row n belongs to prompt n // G
            metrics["time/generate_s"] = time.perf_counter() - t0

            # ---- 3. rewards (the task's business) ------------------------------------------------------------
            t0 = time.perf_counter()
            scored = [task.reward(batch[n // G], text) for n, text in enumerate(completions)]
            rewards = torch.tensor([r for r, _ in scored], dtype=torch.float32)  # (N,)
            metrics["time/score_s"] = time.perf_counter() - t0

            # ---- 4. advantages: each reward against its own group ----------------------------------------------
            advantages, zero_std = group_advantages(rewards, G, scale_by_std=cfg.scale_rewards_by_std)  # (N,), (B,)
            advantages = advantages.to(policy.device)

            # ---- 5. which tokens carry loss, and the fixed log-probs the update compares against --------------
            loss_mask = rollout.completion_mask  # (N, T) 1 up to and including EOS (trap 4)
            if cfg.mask_truncated:  # a cut-off answer is not evidence of a wrong one (trap 8)
                loss_mask = mask_truncated(loss_mask, rollout.truncated)  # (N, T)
            total_tokens = dist.all_sum(loss_mask.sum())  # tokens that carry loss this step, on every rank
            micro_batches = plan_micro_batches(rollout.prompt_mask, rollout.completion_mask, cfg.micro_batch_size,
                                               cfg.micro_batch_tokens)
            # under FSDP every forward is collective: each rank runs as many micro-batches as the busiest one
            micro_batches = distributed.equalize_micro_batches(micro_batches, dist.all_max(len(micro_batches)))

            def logprobs_of(m, rows: slice) -> torch.Tensor:  # (n, T) at the sampling temperature (trap 1)
                args = (rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows],
                        rollout.completion_mask[rows])
                with policy.autocast():
                    if cfg.logprobs == "reference":
                        return distributed.call(completion_logprobs, m, *args, temperature=sampling.temperature,
                                                chunk_tokens=cfg.logprob_chunk_tokens)
                    return distributed.call(completion_logprobs_fast, m, *args, temperature=sampling.temperature,
                                            chunk_tokens=cfg.logprob_chunk_tokens,
                                            prompt_index=rollout.prompt_index[rows], shared_prefix=True)

            old_logp = ref_logp = None
            t0 = time.perf_counter()
            with torch.no_grad():
                if cfg.mu > 1:  # with several passes the ratio must compare against the sampling-time policy
                    model.eval()
                    old_logp = torch.cat([logprobs_of(model, rows) for rows in micro_batches])  # (N, T)
                if cfg.beta > 0:  # the frozen reference: its own copy, or with LoRA the model with adapters off
                    with adapters_disabled(model):
                        ref_logp = torch.cat([logprobs_of(policy.reference or model, rows) for rows in micro_batches])

            # ---- 6. mu policy updates; each micro-batch's loss is divided by the whole step's counts, so their
            #         gradients add up to the full batch's (trap 5). A non-finite loss or gradient is not applied.
            model.train()
            skipped = 0
            for _ in range(cfg.mu):
                sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
                for rows in micro_batches:
                    logp = logprobs_of(model, rows)  # (n, T), with gradient
                    old = old_logp[rows] if old_logp is not None else logp.detach()  # (n, T) mu = 1: ratio 1 (trap 13)
                    ref = ref_logp[rows] if ref_logp is not None else None  # (n, T)
                    loss, stats = grpo_loss(logp, old, ref, advantages[rows], loss_mask[rows],
                                            total_tokens=total_tokens, total_seqs=float(B * G), **loss_settings)
                    loss.backward()  # gradients accumulate in .grad across micro-batches
                    sums["loss"] += float(loss.detach())
                    sums["kl"] += stats["kl"]
                    sums["clipped"] += stats["clipped"]
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                grad_norm = float(distributed.full_tensor(grad_norm))
                if math.isfinite(dist.all_sum(sums["loss"])) and math.isfinite(grad_norm):
                    optimizer.step()
                    policy.weights_changed()  # the sampler's copy of the weights is refreshed before the next rollout
                else:
                    skipped += 1
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            metrics["time/update_s"] = time.perf_counter() - t0
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
            if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise FloatingPointError(f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm "
                                         f"and were skipped (up to step {step}): the learning rate (grpo.lr="
                                         f"{cfg.lr:g}) is the usual cause; the last good checkpoint is untouched")

            # ---- 7. metrics (over every rank's rows), samples, evaluation, checkpoint -------------------------
            parts = [p for _, p in scored]
            metrics.update(step_metrics(dist, rollout, rewards, parts, advantages, zero_std, sums, total_tokens,
                                        cfg.beta > 0, metrics["time/generate_s"]))
            metrics.update({"grad/norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                            "update/skipped_nonfinite": skipped})
            if metrics["adv/frac_zero_std"] == 1.0 and step == start_step + 1:
                log.print("warning: every group's rewards are equal: this step's gradient is exactly zero "
                          "(see README: 'when nothing is learned')")
            if metrics["grad/norm"] == 0.0 and metrics["adv/frac_zero_std"] < 1.0 and not collapse_warned:
                collapse_warned = True  # rewards differ, yet nothing moves: a saturated (collapsed) policy
                log.print(f"warning: the gradient is exactly zero at step {step} although rewards differ within "
                          f"groups: the policy may have collapsed (a learning rate far too high, grpo.lr={cfg.lr:g}, "
                          "does this)")
            log.log(step, metrics)
            if record is not None:
                record.heartbeat(steps=step)
            if run.samples_every > 0 and step % run.samples_every == 0:
                log.samples(step, [  # rank 0's rows
                    {"prompt": batch[n // G]["prompt"], "prompt_id": batch[n // G]["id"], "completion": completions[n],
                     "reward": float(rewards[n]), "parts": parts[n], "advantage": float(advantages[n]),
                     "truncated": bool(rollout.truncated[n]), **task.describe(batch[n // G], completions[n])}
                    for n in range(min(run.samples_per_step, len(completions)))])
            if run.eval_every > 0 and step % run.eval_every == 0 and step < cfg.steps and val_items:
                last_eval = run_eval(step)
            stopping = step < cfg.steps and dist.all_max(stop.requested) > 0  # every rank stops together
            if stopping or (run.save_every > 0 and step % run.save_every == 0 and step < cfg.steps):
                checkpoint(step)
            log.plot()
            bar.set_postfix({"reward": f"{metrics['reward/mean']:.3f}",
                             **{k.split("/")[-1]: f"{metrics[k]:.2f}" for k in task.curve_keys if k in metrics},
                             "len": f"{metrics['len/completion_mean']:.0f}",
                             "gen_s": f"{metrics['time/generate_s']:.1f}"})
            if stopping:
                log.print(f"stopped on request after step {step}: continue with run.resume=latest")
                break
    if stopping:
        log.close()
        return run_dir

    # ---- the end: final evaluation and checkpoint --------------------------------------------------------
    final_eval = run_eval(cfg.steps) if val_items else last_eval
    checkpoint(cfg.steps)
    if dist.is_main:
        write_json(run_dir / "eval.json", {"step": cfg.steps, **final_eval})
        record.finish(steps=cfg.steps)
    log.plot()
    log.close()
    return run_dir


@dataclass
class _EngineConfig:
    model: ModelConfig
    sampling: SamplingConfig
    grpo: GRPOConfig
    run: RunConfig
