"""The GRPO loop, once, top to bottom.

GRPO (DeepSeekMath, Shao et al. 2024) is PPO without a value network: for each prompt we sample a
*group* of G completions, score them with a reward function, and use each completion's reward relative
to its group as the advantage of every one of its tokens. One step of this file:

    1. sample B prompts                         (data order fixed by the seed: resumable)
    2. generate G completions each              (grpo.sampler, KV cache, prefill shared by the group)
    3. score them                               (the task's reward function; the engine never reads text)
    4. group-normalised advantages              (grpo.functional.group_advantages)
    5. old log-probs (mu > 1) and reference log-probs (beta > 0)
    6. mu policy updates: micro-batches, clipped surrogate (+ beta * KL), one global token denominator,
       gradient clipping, AdamW
    7. log metrics and samples; evaluate; checkpoint

Shapes: B prompts per step, G completions per prompt, N = B*G rows, P prompt length, T completion length.
Everything tunable is in grpo.config (ModelConfig, SamplingConfig, GRPOConfig, RunConfig).
"""
from __future__ import annotations

import copy
import math
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from grpo.config import GRPOConfig, ModelConfig, RunConfig, SamplingConfig, save_config
from grpo.functional import aggregate_loss, clipped_surrogate, group_advantages, kl_k3, mask_truncated, masked_mean
from grpo.models import build_random_model, load_model, load_tokenizer, pick_device, pick_dtype
from grpo.policy import completion_logprobs
from grpo.runlog import RunLog, RunRecord, write_json
from grpo.sampler import Rollout, Scaffold, StopStrings, sample
from grpo.task import Task


# ----------------------------------------------------------------------------------------------------
# Plumbing: model + tokenizer, data order, generation helpers, checkpoints
# ----------------------------------------------------------------------------------------------------
@dataclass
class Policy:
    """The trainable model with everything needed to sample from it and score its completions."""
    model: torch.nn.Module
    tokenizer: object
    eos_ids: list[int]
    pad_id: int
    autocast_dtype: torch.dtype | None  # bf16 compute over fp32 master weights on CUDA, None on CPU
    decode_copy: torch.nn.Module | None = None  # the sampler's bf16 copy of the weights (see `decode_model`)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def decode_model(self, decode_weights: str = "auto") -> tuple[torch.nn.Module, bool]:
        """The model the sampler runs and whether to run it under autocast (SamplingConfig.decode_weights).
        With fp32 master weights and bf16 autocast, a copy of the weights in bf16 lets the sampler replay its
        decode step as a CUDA graph (autocast casts every weight at every step, outside any graph): the copy
        is made once, its parameters bf16 and its buffers (the rotary frequencies) as they are, and refreshed
        from the master weights at every call, so it always samples from the current policy."""
        if self.autocast_dtype is None or decode_weights == "master":
            return self.model, True
        if self.decode_copy is None:
            if decode_weights == "auto" and not self._copy_fits():
                return self.model, True
            # deepcopy with every parameter already replaced by its bf16 version: no fp32 copy is ever made
            memo = {id(p): torch.nn.Parameter(p.detach().to(self.autocast_dtype), requires_grad=False)
                    for p in self.model.parameters()}
            self.decode_copy = copy.deepcopy(self.model, memo).eval()
        else:
            with torch.no_grad():
                for target, source in zip(self.decode_copy.parameters(), self.model.parameters()):
                    target.copy_(source)
        return self.decode_copy, False

    def _copy_fits(self) -> bool:
        """`auto`: a CUDA model whose bf16 copy takes under half the free GPU memory."""
        if self.device.type != "cuda":
            return False
        size = sum(p.numel() for p in self.model.parameters()) * torch.finfo(self.autocast_dtype).bits // 8
        return size < 0.5 * torch.cuda.mem_get_info(self.device)[0]


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the generation config's (int or list) and the tokenizer's (trap 4)."""
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def load_policy(cfg: ModelConfig, seed: int = 0, for_training: bool = True) -> Policy:
    """Load (or, with `random_init`, build) the model. For training, weights stay fp32 (master weights:
    updates of ~1e-6 relative size vanish in bf16) and bf16 compute comes from autocast on CUDA."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.name_or_path)
    device = pick_device(cfg.device)
    compute_dtype = pick_dtype(cfg.dtype, device)
    weight_dtype = "float32" if for_training else cfg.dtype
    if cfg.random_init:
        specials = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                    "bos_token_id": tokenizer.bos_token_id}
        model = build_random_model(cfg.random_init, vocab_size=len(tokenizer), seed=seed, dtype=weight_dtype,
                                   device=str(device), special_ids=specials)
    else:
        model = load_model(cfg.name_or_path, dtype=weight_dtype, device=str(device))
    use_autocast = for_training and compute_dtype != torch.float32
    return Policy(model=model, tokenizer=tokenizer, eos_ids=eos_token_ids(model, tokenizer),
                  pad_id=tokenizer.pad_token_id, autocast_dtype=compute_dtype if use_autocast else None)


def data_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """The item order of one epoch: a pure function of (seed, epoch), so resuming needs only the step."""
    return np.random.default_rng([seed, epoch]).permutation(n_items)


def batch_indices(n_items: int, batch: int, step: int, seed: int) -> list[int]:
    """Items of `step` (0-based): positions step*batch ... (step+1)*batch - 1 of the endless epoch stream."""
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, n_items)
        out.append(int(data_order(n_items, seed, epoch)[offset]))
    return out


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    # The prompt text already carries the chat template's special tokens: add none.
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def generate(policy: Policy, prompts: list[str], sampling: SamplingConfig, *, group_size: int = 1,
             greedy: bool = False, generator: torch.Generator | None = None,
             scaffold: Scaffold | None = None) -> Rollout:
    stop = StopStrings(policy.tokenizer, sampling.stop_strings) if sampling.stop_strings else None
    policy.model.eval()  # sampling: no dropout; the KV cache is used (trap 10)
    model, under_autocast = policy.decode_model(sampling.decode_weights)
    with policy.autocast() if under_autocast else nullcontext():
        return sample(model, encode_prompts(policy.tokenizer, prompts), group_size=group_size,
                      max_new_tokens=sampling.max_new_tokens, eos_ids=policy.eos_ids, pad_id=policy.pad_id,
                      temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                      greedy=greedy, generator=generator, stop=stop, scaffold=scaffold,
                      sync_every=1 if policy.device.type == "cpu" else 8)


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """Completion texts, cut at the stopping token. The EOS token's own text is dropped."""
    texts = []
    for ids, mask in zip(rollout.completion_ids, rollout.completion_mask):
        texts.append(tokenizer.decode(ids[: int(mask.sum())].tolist(), skip_special_tokens=True))
    return texts


def greedy_completions(policy: Policy, prompts: list[str], sampling: SamplingConfig, batch_size: int,
                       progress: bool = False) -> tuple[list[str], list[int]]:
    """Greedy decoding in batches (evaluation): completion texts and their token counts."""
    texts, lengths = [], []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="decode", disable=not progress, leave=False):
        rollout = generate(policy, prompts[start:start + batch_size], sampling, greedy=True)
        texts += decode_completions(policy.tokenizer, rollout)
        lengths += [int(n) for n in rollout.completion_lengths]
    return texts, lengths


def evaluate(policy: Policy, task: Task, items: list[dict], sampling: SamplingConfig, batch_size: int) -> dict:
    start = time.perf_counter()
    completions, lengths = greedy_completions(policy, [it["prompt"] for it in items], sampling, batch_size)
    metrics = dict(task.evaluate(items, completions))
    metrics["len_mean"] = float(np.mean(lengths)) if lengths else 0.0
    metrics["time_s"] = time.perf_counter() - start
    return metrics


def make_optimizer(model, lr: float, weight_decay: float, warmup_steps: int, betas=(0.9, 0.999)):
    """AdamW, and a schedule that warms up linearly over `warmup_steps` then stays constant."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    warmup = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    return optimizer, scheduler


def save_checkpoint(path: Path, policy: Policy, optimizer, scheduler, step: int, generator: torch.Generator):
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    policy.model.save_pretrained(tmp, safe_serialization=True)
    policy.tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampling_rng": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate()}, tmp / "trainer_state.pt")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)  # a checkpoint folder either is complete or does not exist


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    found = [p for p in found if (p / "trainer_state.pt").exists()]
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    found = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old)


def _nanmean(values) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


# ----------------------------------------------------------------------------------------------------
# One optimizer step's worth of gradients
# ----------------------------------------------------------------------------------------------------
def plan_micro_batches(prompt_mask: torch.Tensor, completion_mask: torch.Tensor, rows_per_batch: int,
                       token_budget: int = 0) -> list[slice]:
    """Consecutive row ranges, one forward/backward each: `rows_per_batch` rows, or with `token_budget` > 0
    as many rows as fit rows x (longest prompt + longest completion among them) <= token_budget, the size
    of the tensor `completion_logprobs` runs once it has trimmed the padding (a row over budget goes alone).
    Memory then follows the tokens, not the row count: many short completions share one pass."""
    N = prompt_mask.shape[0]
    if token_budget <= 0:
        return [slice(i, i + rows_per_batch) for i in range(0, N, rows_per_batch)]
    prompt_len = prompt_mask.sum(-1).tolist()  # (N,) real prompt tokens per row
    completion_len = completion_mask.sum(-1).tolist()  # (N,)
    batches, start, longest_p, longest_c = [], 0, 0, 0
    for row in range(N):
        p, c = max(longest_p, prompt_len[row]), max(longest_c, completion_len[row])
        if row > start and (row - start + 1) * (p + c) > token_budget:
            batches.append(slice(start, row))
            start, p, c = row, prompt_len[row], completion_len[row]
        longest_p, longest_c = p, c
    batches.append(slice(start, N))
    return batches


def accumulate_policy_gradients(logprobs_of, micro_batches: list[slice], advantages: torch.Tensor,
                                mask: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                                cfg: GRPOConfig, max_completion_len: int) -> dict[str, float]:
    """Backward the GRPO loss of a whole rollout, one micro-batch at a time.

    `logprobs_of(rows)` gives the current policy's (n, T) log-probs of those rows (with gradient). Every
    micro-batch's loss is normalised by the *whole* step's token / sequence count, so the accumulated
    gradient is exactly the full-batch gradient, whatever the split (GRPO_NOTES trap 5). Returns the summed
    loss, KL and clipped-token count for logging.
    """
    N = advantages.shape[0]
    total_tokens = float(mask.sum().clamp(min=1.0))
    sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
    for rows in micro_batches:
        logp = logprobs_of(rows)  # (n, T)
        # mu = 1: old_logp = logp.detach(), so the ratio is 1 and the gradient is the plain policy
        # gradient; the loss value is then -mean(A), ~0 by construction (trap 13).
        old = old_logp[rows] if old_logp is not None else logp.detach()  # (n, T)
        per_token, clipped = clipped_surrogate(logp, old, advantages[rows], cfg.clip_eps_low,
                                               cfg.clip_eps_high)  # (n, T), (n, T)
        if ref_logp is not None:
            kl = kl_k3(logp, ref_logp[rows], clamp=cfg.kl_clamp)  # (n, T)
            per_token = per_token + cfg.beta * kl
            sums["kl"] += float((kl.detach() * mask[rows]).sum())
        loss = aggregate_loss(per_token, mask[rows], cfg.loss_agg, total_tokens=total_tokens,
                              total_seqs=float(N), max_completion_len=max_completion_len)
        loss.backward()  # gradients accumulate in .grad across micro-batches
        sums["loss"] += float(loss.detach())
        sums["clipped"] += float((clipped.float() * mask[rows]).sum())
    return sums


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
def train(model_cfg: ModelConfig, sampling: SamplingConfig, cfg: GRPOConfig, run: RunConfig, task: Task,
          full_config=None) -> Path:
    """Train with GRPO; returns the run folder. `full_config` (any dataclass) is saved as config.yaml."""
    run_dir = Path(run.output_dir or f"runs/{run.name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(full_config if full_config is not None else
                _EngineConfig(model_cfg, sampling, cfg, run), run_dir / "config.yaml")
    record = RunRecord(run_dir, resumed=bool(run.resume))  # run.json: the command line and the wall time
    torch.manual_seed(run.seed)
    random.seed(run.seed)

    # ---- the policy, the optional frozen reference, the optimizer -------------------------------------
    policy = load_policy(model_cfg, seed=run.seed)
    model = policy.model
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # With beta = 0 the KL term vanishes: loading a reference model would only cost memory (trap 9).
    reference = copy.deepcopy(model).requires_grad_(False).eval() if cfg.beta > 0 else None
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.adam_betas)
    generator = torch.Generator(device=policy.device).manual_seed(run.seed)

    train_items = task.items("train")
    val_items = task.items("val")[: run.eval_examples] if run.eval_examples > 0 else []
    if len(train_items) == 0:
        raise ValueError("the task has no training items")
    B, G = cfg.batch_prompts, cfg.group_size

    log = RunLog(run_dir, ["reward/mean", *task.curve_keys], tensorboard=run.tensorboard, plot=run.plot)
    start_step = 0
    if run.resume:
        ckpt = find_latest_checkpoint(run_dir) if run.resume == "latest" else Path(run.resume)
        if ckpt is not None:
            start_step = _resume(ckpt, policy, optimizer, scheduler, generator)
            log.truncate_after(start_step)
            print(f"resumed from {ckpt} at step {start_step}")
        else:
            print(f"run.resume=latest: no checkpoint in {run_dir / 'checkpoints'}, starting from step 0")

    def run_eval(step: int) -> dict:
        if not val_items:
            return {}
        metrics = {f"eval/{k}": v for k, v in evaluate(policy, task, val_items, sampling, run.eval_batch_size).items()}
        log.log(step, metrics)
        return metrics

    last_eval = {}
    if start_step == 0 and run.eval_at_start:
        last_eval = run_eval(0)

    bar = tqdm(range(start_step, cfg.steps), desc="grpo", initial=start_step, total=cfg.steps)
    for step in bar:
        metrics: dict[str, float] = {}

        # ---- 1. a batch of B prompts --------------------------------------------------------------------
        batch = [train_items[i] for i in batch_indices(len(train_items), B, step, run.seed)]

        # ---- 2. G completions per prompt ------------------------------------------------------------------
        t0 = time.perf_counter()
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

        # ---- 5. which tokens count, and the fixed log-probs the update compares against -------------------
        mask = rollout.completion_mask  # (N, T) 1 up to and including EOS (trap 4)
        if cfg.mask_truncated:  # a cut-off answer is not evidence of a wrong one (trap 8)
            mask = mask_truncated(mask, rollout.truncated)
        total_tokens = mask.sum().clamp(min=1.0)  # tokens that carry loss this step (for the per-token metrics)
        micro_batches = plan_micro_batches(rollout.prompt_mask, rollout.completion_mask, cfg.micro_batch_size,
                                           cfg.micro_batch_tokens)

        def logprobs_of(m, rows: slice) -> torch.Tensor:  # (n, T) at the sampling temperature (trap 1)
            with policy.autocast():
                return completion_logprobs(m, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                           rollout.completion_ids[rows], rollout.completion_mask[rows],
                                           temperature=sampling.temperature, chunk_tokens=cfg.logprob_chunk_tokens,
                                           prompt_index=rollout.prompt_index[rows] if cfg.share_prompt_forward else None)

        old_logp = ref_logp = None
        t0 = time.perf_counter()
        with torch.no_grad():
            if cfg.mu > 1:  # with several passes the ratio must compare against the sampling-time policy
                model.eval()
                old_logp = torch.cat([logprobs_of(model, rows) for rows in micro_batches])  # (N, T)
            if reference is not None:
                ref_logp = torch.cat([logprobs_of(reference, rows) for rows in micro_batches])  # (N, T)

        # ---- 6. mu policy updates over the rollout -----------------------------------------------------------
        model.train()
        for _ in range(cfg.mu):
            sums = accumulate_policy_gradients(lambda rows: logprobs_of(model, rows), micro_batches, advantages,
                                               mask, old_logp, ref_logp, cfg, max_completion_len=sampling.max_new_tokens)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        metrics["time/update_s"] = time.perf_counter() - t0

        # ---- 7. metrics, samples, evaluation, checkpoint ------------------------------------------------------
        parts = [p for _, p in scored]
        lengths = rollout.completion_lengths  # (N,)
        gen_tokens = float(lengths.sum())
        metrics.update({
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std(unbiased=False)),
            **{f"reward/{k}": _nanmean([p.get(k, float("nan")) for p in parts]) for k in parts[0]},
            "adv/frac_zero_std": float(zero_std.float().mean()),
            "adv/abs_mean": float(advantages.abs().mean()),
            "len/completion_mean": float(lengths.mean()),
            "len/completion_max": float(lengths.max()),
            "len/truncated_frac": float(rollout.truncated.float().mean()),
            "loss/policy": sums["loss"],
            "kl": sums["kl"] / float(total_tokens) if reference is not None else 0.0,
            "clip/frac": sums["clipped"] / float(total_tokens),
            # -E[log p(sampled token)] is an unbiased estimate of the policy's per-token entropy
            "entropy": float(-masked_mean(rollout.logp, rollout.completion_mask)),
            "grad/norm": float(grad_norm),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": gen_tokens / max(metrics["time/generate_s"], 1e-9),
        })
        if metrics["adv/frac_zero_std"] == 1.0 and step == start_step:
            tqdm.write("warning: every group's rewards are equal: this step's gradient is exactly zero "
                       "(see README: 'when nothing is learned')")
        log.log(step + 1, metrics)
        if run.samples_every > 0 and (step + 1) % run.samples_every == 0:
            log.samples(step + 1, [
                {"prompt": batch[n // G]["prompt"], "item_id": batch[n // G]["id"], "completion": completions[n],
                 "reward": float(rewards[n]), "parts": parts[n], "advantage": float(advantages[n]),
                 "truncated": bool(rollout.truncated[n]), **task.describe(batch[n // G], completions[n])}
                for n in range(min(run.samples_per_step, B * G))])
        if run.eval_every > 0 and (step + 1) % run.eval_every == 0 and step + 1 < cfg.steps:
            last_eval = run_eval(step + 1)
        if run.save_every > 0 and (step + 1) % run.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(run_dir / "checkpoints" / f"step_{step + 1}", policy, optimizer, scheduler,
                            step + 1, generator)
            prune_checkpoints(run_dir, run.keep_checkpoints)
        log.plot()
        bar.set_postfix({"reward": f"{metrics['reward/mean']:.3f}",
                         **{k.split("/")[-1]: f"{metrics[k]:.2f}" for k in task.curve_keys if k in metrics},
                         "len": f"{metrics['len/completion_mean']:.0f}", "gen_s": f"{metrics['time/generate_s']:.1f}"})

    # ---- the end: final evaluation and checkpoint --------------------------------------------------------
    final_eval = run_eval(cfg.steps) if val_items else last_eval
    write_json(run_dir / "eval.json", {"step": cfg.steps, **final_eval})
    save_checkpoint(run_dir / "checkpoints" / f"step_{cfg.steps}", policy, optimizer, scheduler, cfg.steps, generator)
    prune_checkpoints(run_dir, max(run.keep_checkpoints, 1))
    log.plot()
    log.close()
    record.finish(steps=cfg.steps)
    return run_dir


@dataclass
class _EngineConfig:
    model: ModelConfig
    sampling: SamplingConfig
    grpo: GRPOConfig
    run: RunConfig


def _resume(ckpt: Path, policy: Policy, optimizer, scheduler, generator) -> int:
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        weights.update(load_file(str(shard), device=str(policy.device)))
    missing, unexpected = policy.model.load_state_dict(weights, strict=False)
    # tied embeddings are saved once; anything else missing means a different architecture
    missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = torch.load(ckpt / "trainer_state.pt", map_location=policy.device, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["sampling_rng"].cpu() if hasattr(state["sampling_rng"], "cpu") else state["sampling_rng"])
    torch.set_rng_state(state["torch_rng"].cpu())
    random.setstate(state["python_rng"])
    return int(state["step"])
