"""What a GRPO step logs about its rollout and its update, over the rows of every rank (grpo/train.py)."""
from __future__ import annotations

import numpy as np

from grpo.functional import masked_sum


def step_metrics(dist, rollout, rewards, parts, advantages, zero_std, sums, total_tokens, with_kl,
                 generate_s) -> dict:
    """What a step logs about its rollout and its update, over the rows of every rank."""
    every_part = [p for rank_parts in dist.gather_objects(parts) for p in rank_parts]
    all_rewards, all_lengths = dist.gather(rewards), dist.gather(rollout.completion_lengths)  # (B*G,) each
    return {
        "reward/mean": float(all_rewards.mean()),
        "reward/std": float(all_rewards.std(unbiased=False)),
        **{f"reward/{k}": _nanmean([p.get(k, float("nan")) for p in every_part]) for k in parts[0]},
        "adv/frac_zero_std": float(dist.gather(zero_std).float().mean()),
        "adv/abs_mean": float(dist.gather(advantages).abs().mean()),
        "len/completion_mean": float(all_lengths.float().mean()),
        "len/completion_max": float(all_lengths.max()),
        "len/truncated_frac": float(dist.gather(rollout.truncated).float().mean()),
        "loss/policy": dist.all_sum(sums["loss"]),
        "kl": dist.all_sum(sums["kl"]) / total_tokens if with_kl else 0.0,
        "clip/frac": dist.all_sum(sums["clipped"]) / total_tokens,
        # -E[log p(sampled token)] is an unbiased estimate of the policy's per-token entropy
        "entropy": -dist.all_sum(masked_sum(rollout.logp, rollout.completion_mask)) /
                   max(dist.all_sum(rollout.completion_mask.sum()), 1.0),
        "tokens_per_s": float(all_lengths.sum()) / max(generate_s, 1e-9),
    }


def _nanmean(values) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
