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
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from grpo import distributed
from grpo.checkpoint import find_latest_checkpoint, prune_checkpoints, resume, save_checkpoint
from grpo.config import GRPOConfig, ModelConfig, RunConfig, SamplingConfig, save_config
from grpo.distributed import Dist
from grpo.functional import aggregate_loss, clipped_surrogate, group_advantages, kl_k3, mask_truncated, masked_sum
from grpo.models import build_random_model, load_model, load_tokenizer, pick_device, pick_dtype
from grpo.lora import add_lora, adapters_disabled
from grpo.policy import completion_logprobs
from grpo.runlog import RunLog, RunRecord, claim_run_folder, write_json
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
    decode_copy: torch.nn.Module | None = None  # the sampler's plain copy of the weights (see `decode_model`)
    copy_required: bool = False  # sharded or LoRA models cannot be sampled from directly: always the copy
    reference: torch.nn.Module | None = None  # the frozen KL reference (beta > 0, no LoRA)
    dist: Dist = field(default_factory=Dist)
    stale: bool = True  # the decode copy is older than the weights

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def weights_changed(self) -> None:
        """Call after every update: the next generation refreshes the decode copy first."""
        self.stale = True

    def decode_model(self, decode_weights: str = "auto") -> tuple[torch.nn.Module, bool]:
        """The model the sampler runs and whether to run it under autocast (SamplingConfig.decode_weights).
        With fp32 master weights and bf16 autocast, a copy of the weights in bf16 lets the sampler replay its
        decode step as a CUDA graph (autocast casts every weight at every step, outside any graph). A sharded
        model (torchrun) or one with LoRA adapters is always sampled through its copy: the copy is a plain
        Hugging Face model of the full, merged weights, so every rank samples alone, with the fast decoder.
        The copy is refreshed from the weights, parameter by parameter, whenever they have changed."""
        if not self.copy_required and (self.autocast_dtype is None or decode_weights == "master" or (
                self.decode_copy is None and decode_weights == "auto" and not self._copy_fits())):
            return self.model, True
        if self.decode_copy is None:
            self.decode_copy = plain_copy(self.model, self.autocast_dtype)
        if self.stale:  # every rank gets here together: each parameter is an all-gather when sharded
            with torch.no_grad():
                targets = dict(self.decode_copy.named_parameters())
                for name, value in distributed.full_parameters(self.model, next(iter(targets.values())).dtype):
                    targets[name].copy_(value)
            self.stale = False
        return self.decode_copy, False

    def _copy_fits(self) -> bool:
        """`auto`: a CUDA model whose bf16 copy takes under half the free GPU memory."""
        if self.device.type != "cuda":
            return False
        size = sum(p.numel() for p in self.model.parameters()) * torch.finfo(self.autocast_dtype).bits // 8
        return size < 0.5 * torch.cuda.mem_get_info(self.device)[0]


def plain_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A frozen copy of `model` with its parameters in `dtype` (buffers such as the rotary frequencies as they
    are): deepcopy with every parameter already replaced by its cast version, so no second fp32 copy is made."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype or p.dtype), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


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


def load_policy(cfg: ModelConfig, seed: int = 0, for_training: bool = True, dist: Dist = Dist(),
                with_reference: bool = False) -> Policy:
    """Load (or, with `random_init`, build) the model. For training, weights stay fp32 (master weights:
    updates of ~1e-6 relative size vanish in bf16) and bf16 compute comes from autocast on CUDA; then
    `prepare_training` adds what the configuration asks for (reference, LoRA, sharding)."""
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
    policy = Policy(model=model, tokenizer=tokenizer, eos_ids=eos_token_ids(model, tokenizer),
                    pad_id=tokenizer.pad_token_id, autocast_dtype=compute_dtype if use_autocast else None, dist=dist)
    if for_training:
        prepare_training(policy, cfg, dist, with_reference)
    return policy


def prepare_training(policy: Policy, cfg: ModelConfig, dist: Dist, with_reference: bool) -> None:
    """In this order: gradient checkpointing; the KL reference (a frozen copy; with LoRA none is needed: the
    reference is the model with its adapters off); LoRA adapters over bf16 base weights (CUDA); the decode
    copy, taken before adapters or sharding change the model; FSDP2 sharding of model and reference."""
    model, lora = policy.model, cfg.lora.rank > 0
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if with_reference and not lora:
        policy.reference = copy.deepcopy(model).requires_grad_(False).eval()
    if lora and policy.autocast_dtype is not None:
        model.to(policy.autocast_dtype)  # frozen: nothing to update, so no need for fp32 master weights
    if lora or dist.enabled:
        policy.decode_copy, policy.copy_required = plain_copy(model, policy.autocast_dtype), True
    if lora:
        add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    if dist.enabled:
        distributed.shard_model(model, dist, policy.autocast_dtype, cfg.cpu_offload)
        if policy.reference is not None:
            distributed.shard_model(policy.reference, dist, policy.autocast_dtype)


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
    """Greedy completions of `items` and the task's metrics. Under torchrun each rank decodes every W-th item
    and every rank then scores all of them."""
    start = time.perf_counter()
    dist = policy.dist
    policy.decode_model(sampling.decode_weights)  # all ranks refresh the decode copy together, first
    mine = items[dist.rank::dist.world_size]
    completions, lengths = greedy_completions(policy, [it["prompt"] for it in mine], sampling, batch_size)
    if dist.enabled:  # one gather for both lists
        completions, lengths = map(list, zip(*dist.unshare(list(zip(completions, lengths)), len(items))))
    metrics = dict(task.evaluate(items, completions))
    metrics["len_mean"] = float(np.mean(lengths)) if lengths else 0.0
    metrics["time_s"] = time.perf_counter() - start
    return metrics


def make_optimizer(model, lr: float, weight_decay: float, warmup_steps: int, betas=(0.9, 0.999)):
    """AdamW, and a schedule that warms up linearly over `warmup_steps` then stays constant."""
    trainable = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    warmup = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    return optimizer, scheduler


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
                                cfg: GRPOConfig, max_completion_len: int, total_tokens: float | None = None,
                                total_seqs: float | None = None) -> dict[str, float]:
    """Backward the GRPO loss of a whole rollout, one micro-batch at a time.

    `logprobs_of(rows)` gives the current policy's (n, T) log-probs of those rows (with gradient). Every
    micro-batch's loss is normalised by the *whole* step's token / sequence count, so the accumulated
    gradient is exactly the full-batch gradient, whatever the split (docs/grpo.md trap 5). Under torchrun the
    caller passes the counts of every rank (`total_tokens`, `total_seqs`; by default this rank's own).
    Returns the summed loss, KL and clipped-token count for logging.
    """
    total_tokens = float(mask.sum()) if total_tokens is None else total_tokens
    total_tokens = max(total_tokens, 1.0)
    total_seqs = float(advantages.shape[0]) if total_seqs is None else total_seqs
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
                              total_seqs=total_seqs, max_completion_len=max_completion_len)
        loss.backward()  # gradients accumulate in .grad across micro-batches
        sums["loss"] += float(loss.detach())
        sums["clipped"] += float((clipped.float() * mask[rows]).sum())
    return sums


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
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
        save_config(full_config if full_config is not None else
                    _EngineConfig(model_cfg, sampling, cfg, run), run_dir / "config.yaml")
    record = RunRecord(run_dir, resumed=bool(run.resume)) if dist.is_main else None  # run.json: command, wall time
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.adam_betas)
    generator = torch.Generator(device=policy.device)
    B, G = cfg.batch_prompts, cfg.group_size

    log = RunLog(run_dir, ["reward/mean", *task.curve_keys], tensorboard=run.tensorboard, plot=run.plot,
                 enabled=dist.is_main)
    start_step = 0
    if run.resume:
        ckpt = find_latest_checkpoint(run_dir) if run.resume == "latest" else Path(run.resume)
        if ckpt is not None:
            start_step = resume(ckpt, policy, optimizer, scheduler, dist)
            log.truncate_after(start_step)
            log.print(f"resumed from {ckpt} at step {start_step}")
        else:
            log.truncate_after(-1)  # killed before its first checkpoint: its metrics start over with it
            log.print(f"run.resume=latest: no checkpoint in {run_dir / 'checkpoints'}, starting from step 0")

    def run_eval(step: int) -> dict:
        if not val_items:
            return {}
        metrics = {f"eval/{k}": v for k, v in evaluate(policy, task, val_items, sampling, run.eval_batch_size).items()}
        log.log(step, metrics)
        return metrics

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir / "checkpoints" / f"step_{step}", policy, optimizer, scheduler, step, dist, model_cfg.lora)

    last_eval, nonfinite_in_a_row, collapse_warned = {}, 0, False
    if start_step == 0 and run.eval_at_start:
        last_eval = run_eval(0)

    bar = tqdm(range(start_step, cfg.steps), desc="grpo", initial=start_step, total=cfg.steps, disable=not dist.is_main)
    for step in bar:
        metrics: dict[str, float] = {}

        # ---- 1. a batch of B prompts (under torchrun: this rank's share of them) -------------------------
        batch = [train_items[i] for i in batch_indices(len(train_items), B, step, run.seed)][mine]

        # ---- 2. G completions per prompt ------------------------------------------------------------------
        t0 = time.perf_counter()
        generator.manual_seed(distributed.step_seed(run.seed, step, dist.rank))
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
        total_tokens = dist.all_sum(mask.sum())  # tokens that carry loss this step, on every rank
        micro_batches = plan_micro_batches(rollout.prompt_mask, rollout.completion_mask, cfg.micro_batch_size,
                                           cfg.micro_batch_tokens)
        # under FSDP every forward is collective: each rank runs as many micro-batches as the busiest one
        micro_batches = distributed.equalize_micro_batches(micro_batches, dist.all_max(len(micro_batches)))

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
            if cfg.beta > 0:  # the frozen reference: its own copy, or with LoRA the model with adapters off
                with adapters_disabled(model):
                    reference = policy.reference or model
                    ref_logp = torch.cat([logprobs_of(reference, rows) for rows in micro_batches])  # (N, T)

        # ---- 6. mu policy updates over the rollout (one whose loss or gradient is not finite is skipped) ------
        model.train()
        skipped = 0
        for _ in range(cfg.mu):
            sums = accumulate_policy_gradients(lambda rows: logprobs_of(model, rows), micro_batches, advantages,
                                               mask, old_logp, ref_logp, cfg, max_completion_len=sampling.max_new_tokens,
                                               total_tokens=total_tokens, total_seqs=float(B * G))
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            if math.isfinite(dist.all_sum(sums["loss"])) and math.isfinite(float(distributed.full_tensor(grad_norm))):
                optimizer.step()
                policy.weights_changed()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        metrics["time/update_s"] = time.perf_counter() - t0
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
        if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            raise FloatingPointError(f"{nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm "
                                     f"and were skipped (up to step {step + 1}): the learning rate (grpo.lr="
                                     f"{cfg.lr:g}) is the usual cause; the last good checkpoint is untouched")

        # ---- 7. metrics (over every rank's rows), samples, evaluation, checkpoint -------------------------
        parts = [p for _, p in scored]
        every_part = [p for rank_parts in dist.gather_objects(parts) for p in rank_parts]
        all_rewards, all_lengths = dist.gather(rewards), dist.gather(rollout.completion_lengths)  # (B*G,) each
        metrics.update({
            "reward/mean": float(all_rewards.mean()),
            "reward/std": float(all_rewards.std(unbiased=False)),
            **{f"reward/{k}": _nanmean([p.get(k, float("nan")) for p in every_part]) for k in parts[0]},
            "adv/frac_zero_std": float(dist.gather(zero_std).float().mean()),
            "adv/abs_mean": float(dist.gather(advantages).abs().mean()),
            "len/completion_mean": float(all_lengths.float().mean()),
            "len/completion_max": float(all_lengths.max()),
            "len/truncated_frac": float(dist.gather(rollout.truncated).float().mean()),
            "loss/policy": dist.all_sum(sums["loss"]),
            "kl": dist.all_sum(sums["kl"]) / total_tokens if cfg.beta > 0 else 0.0,
            "clip/frac": dist.all_sum(sums["clipped"]) / total_tokens,
            # -E[log p(sampled token)] is an unbiased estimate of the policy's per-token entropy
            "entropy": -dist.all_sum(masked_sum(rollout.logp, rollout.completion_mask)) /
                       max(dist.all_sum(rollout.completion_mask.sum()), 1.0),
            "grad/norm": float(distributed.full_tensor(grad_norm)),
            "lr": scheduler.get_last_lr()[0],
            "update/skipped_nonfinite": skipped,
            "tokens_per_s": float(all_lengths.sum()) / max(metrics["time/generate_s"], 1e-9),
        })
        if metrics["adv/frac_zero_std"] == 1.0 and step == start_step:
            log.print("warning: every group's rewards are equal: this step's gradient is exactly zero "
                      "(see README: 'when nothing is learned')")
        if metrics["grad/norm"] == 0.0 and metrics["adv/frac_zero_std"] < 1.0 and not collapse_warned:
            collapse_warned = True  # rewards differ, yet nothing moves: a saturated (collapsed) policy
            log.print(f"warning: the gradient is exactly zero at step {step + 1} although rewards differ within "
                      f"groups: the policy may have collapsed (a learning rate far too high, grpo.lr={cfg.lr:g}, "
                      "does this)")
        log.log(step + 1, metrics)
        if record is not None:
            record.heartbeat(steps=step + 1)
        if run.samples_every > 0 and (step + 1) % run.samples_every == 0:
            log.samples(step + 1, [  # rank 0's rows
                {"prompt": batch[n // G]["prompt"], "item_id": batch[n // G]["id"], "completion": completions[n],
                 "reward": float(rewards[n]), "parts": parts[n], "advantage": float(advantages[n]),
                 "truncated": bool(rollout.truncated[n]), **task.describe(batch[n // G], completions[n])}
                for n in range(min(run.samples_per_step, len(completions)))])
        if run.eval_every > 0 and (step + 1) % run.eval_every == 0 and step + 1 < cfg.steps:
            last_eval = run_eval(step + 1)
        if run.save_every > 0 and (step + 1) % run.save_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1)
            if dist.is_main:
                prune_checkpoints(run_dir, run.keep_checkpoints)
        log.plot()
        bar.set_postfix({"reward": f"{metrics['reward/mean']:.3f}",
                         **{k.split("/")[-1]: f"{metrics[k]:.2f}" for k in task.curve_keys if k in metrics},
                         "len": f"{metrics['len/completion_mean']:.0f}", "gen_s": f"{metrics['time/generate_s']:.1f}"})

    # ---- the end: final evaluation and checkpoint --------------------------------------------------------
    final_eval = run_eval(cfg.steps) if val_items else last_eval
    checkpoint(cfg.steps)
    if dist.is_main:
        write_json(run_dir / "eval.json", {"step": cfg.steps, **final_eval})
        prune_checkpoints(run_dir, max(run.keep_checkpoints, 1))
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
