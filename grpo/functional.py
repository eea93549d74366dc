"""The pure tensor math of GRPO: log-probs, advantages, clipped surrogate, KL, loss aggregation, masks.

Every function takes tensors and numbers (never a config or a model), returns new tensors, and never writes into
its arguments. Each one is small enough to check against numbers worked out by hand (tests/test_functional.py).

Sources cited below:
  DeepSeekMath  Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning" (GRPO itself).
  Dr. GRPO      Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective".
  DAPO          Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale".
  NOTES         docs/grpo.md, "Traps that silently break GRPO" (trap numbers).

Shape legend
  B  prompts in a step
  G  group size: completions sampled per prompt
  N  = B * G, completions (sequences) in a step; laid out group-contiguous: prompt b owns rows b*G .. b*G+G-1
  T  completion length (padded)
  V  vocabulary size
  H  hidden size of the final hidden states
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# The loss aggregations `aggregate_loss` accepts; the first is the default of the training config.
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "dr_grpo")


# ----------------------------------------------------------------------------------------------------------------
# Masked reductions
# ----------------------------------------------------------------------------------------------------------------

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` where `mask` is 1 (mask: 0/1 float or bool, same shape as x); over all elements or along `dim`."""
    assert x.shape == mask.shape, f"x {tuple(x.shape)} and mask {tuple(mask.shape)} must have the same shape"
    # torch.where rather than x * mask: a masked-out position may hold inf or nan (e.g. the log-prob of a padding
    # token), and 0 * inf = nan would poison the sum; where() also sends exactly zero gradient to those positions.
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))  # same shape as x
    return kept.sum() if dim is None else kept.sum(dim=dim)  # () or x.shape without `dim`


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1; a slice with no kept position gives 0 (not nan)."""
    assert x.shape == mask.shape, f"x {tuple(x.shape)} and mask {tuple(mask.shape)} must have the same shape"
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim=dim)  # () or x.shape without dim
    # An all-masked slice has sum 0; dividing by max(count, 1) turns 0/0 into 0 instead of nan.
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)  # () or x.shape without `dim`


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities, a few tokens at a time (NOTES trap 11: never hold full-vocabulary fp32 logits)
# ----------------------------------------------------------------------------------------------------------------

def _target_logp_fp32(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[target] for one chunk, in float32. logits (..., V), targets (...)."""
    # float32 before the softmax: bf16 keeps ~3 significant digits, too few for a logsumexp over ~50k logits.
    scaled = logits.float() / temperature  # (..., V)  fp32 copy of this chunk only
    # log p(target) = z_target - logsumexp(z): no (..., V) log_softmax tensor is needed next to `scaled`.
    target_logit = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)
    return target_logit - torch.logsumexp(scaled, dim=-1)  # (...)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _target_logp_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """One chunk: hidden (n, H) -> logits (n, V) -> log p(target) (n,) in float32."""
    # The projection runs in the model's own dtype, exactly as its lm_head would, so these log-probs match the
    # ones of the model that sampled (NOTES trap 1); only the softmax is up-cast.
    logits = F.linear(hidden, weight, bias)  # (n, V)
    return _target_logp_fp32(logits, targets, temperature)  # (n,)


def logprobs_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                         temperature: float = 1.0, chunk_tokens: int = 1024,
                         lm_head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of each target token, float32 (N, T), from final hidden states (N, T, H).

    Same value as projecting with the lm_head (V, H) to logits and taking log_softmax(logits / temperature) at
    the targets, but the (N, T, V) logits never exist: the N*T positions are processed `chunk_tokens` at a time,
    in forward and (by recomputation) in backward. Gradients flow to `hidden`, `lm_head_weight` and `lm_head_bias`.
    """
    assert hidden.dim() == 3, f"hidden must be (N, T, H), got {tuple(hidden.shape)}"
    n_seq, seq_len, hidden_size = hidden.shape
    assert lm_head_weight.dim() == 2 and lm_head_weight.shape[1] == hidden_size, \
        f"lm_head_weight must be (V, H={hidden_size}), got {tuple(lm_head_weight.shape)}"
    assert lm_head_bias is None or lm_head_bias.shape == lm_head_weight.shape[:1], "lm_head_bias must be (V,)"
    assert targets.shape == (n_seq, seq_len), f"targets {tuple(targets.shape)} must be (N, T) = {(n_seq, seq_len)}"
    assert not targets.is_floating_point(), "targets must be integer token ids"
    assert temperature > 0 and chunk_tokens >= 1
    flat_hidden = hidden.reshape(n_seq * seq_len, hidden_size)  # (N*T, H)
    flat_targets = targets.reshape(n_seq * seq_len)  # (N*T,)
    # Checkpointing each chunk keeps only its inputs for backward (views of hidden, plus the weight), never its
    # (chunk_tokens, V) logits: peak memory is one chunk of logits, at the price of recomputing each chunk once.
    use_checkpoint = _needs_grad(hidden, lm_head_weight, lm_head_bias)
    pieces = []
    for hidden_chunk, targets_chunk in zip(flat_hidden.split(chunk_tokens, dim=0),
                                           flat_targets.split(chunk_tokens, dim=0)):
        # hidden_chunk (n, H) with n <= chunk_tokens; targets_chunk (n,)
        if use_checkpoint:
            logp_chunk = checkpoint(_target_logp_from_hidden, hidden_chunk, lm_head_weight, lm_head_bias,
                                    targets_chunk, temperature, use_reentrant=False,
                                    preserve_rng_state=False)  # (n,)
        else:
            logp_chunk = _target_logp_from_hidden(hidden_chunk, lm_head_weight, lm_head_bias,
                                                  targets_chunk, temperature)  # (n,)
        pieces.append(logp_chunk)
    return torch.cat(pieces, dim=0).reshape(n_seq, seq_len)  # (N*T,) -> (N, T)


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4,
                     std_floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages (float32 (N,)) and the zero-variance flag of each group (bool (B,)).

    rewards (N,) are group-contiguous: prompt b's G completions are rows b*G .. b*G+G-1 (NOTES trap 7: the
    caller groups by prompt index, after gathering rewards from every rank).
    scale_by_std=True:  A = (r - mean) / (std + eps)   (DeepSeekMath, outcome supervision)
    scale_by_std=False: A = r - mean                   (Dr. GRPO: dividing by std up-weights nearly-solved
                                                        and nearly-hopeless prompts, whose std is small)
    std is the population std (divide by G, as DeepSeekMath's normalisation over the group's own rewards).
    """
    assert rewards.dim() == 1, f"rewards must be (N,), got {tuple(rewards.shape)}"
    assert group_size >= 1 and rewards.numel() % group_size == 0, \
        f"N={rewards.numel()} rewards cannot be split into groups of G={group_size}"
    assert eps >= 0 and std_floor >= 0
    # Advantages are constants of the policy-gradient step: no gradient flows into the rewards.
    # float64 and two passes (mean first, then mean squared deviation), NOTES trap 6: equal graded rewards such
    # as [0.7, 0.7, 0.7] must give a std of ~1e-16, not a float32 residue of ~1e-7 that eps cannot absorb.
    grouped = rewards.detach().to(torch.float64).reshape(-1, group_size)  # (B, G)
    group_mean = grouped.mean(dim=1, keepdim=True)  # (B, 1)
    deviation = grouped - group_mean  # (B, G)
    group_std = deviation.pow(2).mean(dim=1, keepdim=True).sqrt()  # (B, 1)  population std (unbiased=False)
    # A group whose rewards are all equal carries no learning signal (DAPO resamples such groups); its
    # advantages are exactly 0 so that residue never turns into a gradient.
    zero_std = group_std.squeeze(1) < std_floor  # (B,) bool
    advantages = deviation / (group_std + eps) if scale_by_std else deviation  # (B, G)
    advantages = torch.where(zero_std.unsqueeze(1), torch.zeros_like(advantages), advantages)  # (B, G)
    return advantages.reshape(-1).to(torch.float32), zero_std  # (N,), (B,)


# ----------------------------------------------------------------------------------------------------------------
# Per-token objective: clipped surrogate and KL
# ----------------------------------------------------------------------------------------------------------------

def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token, to minimise: -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A).

    logp, old_logp (N, T); advantages (N,), shared by every token of a completion (DeepSeekMath, outcome
    supervision). eps_high > eps_low is DAPO's clip-higher (0.2 / 0.28): it leaves room to raise the probability
    of unlikely tokens, against entropy collapse. Returns the per-token loss (N, T) and `is_clipped` (N, T) bool:
    tokens where the clipped branch is the smaller one and differs from the unclipped, i.e. the gradient is 0.
    With old_logp = logp.detach() (one update per rollout) rho = 1, the loss value is -A on every token and its
    gradient is that of -A * logp: the loss reads ~0 while the update is not (NOTES trap 13).
    """
    assert logp.dim() == 2, f"logp must be (N, T), got {tuple(logp.shape)}"
    assert old_logp.shape == logp.shape, f"old_logp {tuple(old_logp.shape)} must match logp {tuple(logp.shape)}"
    assert advantages.shape == logp.shape[:1], \
        f"advantages {tuple(advantages.shape)} must be (N,) = {tuple(logp.shape[:1])}"
    assert 0.0 <= eps_low < 1.0 and eps_high >= 0.0
    ratio = torch.exp(logp - old_logp)  # (N, T)  rho; old_logp carries no gradient by construction of the caller
    adv = advantages.unsqueeze(1)  # (N, 1)  broadcast over the tokens of each completion
    unclipped = ratio * adv  # (N, T)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv  # (N, T)
    # min(unclipped, clipped) written as a where() on is_clipped: the same value and gradient, and the returned
    # flag is by construction the rule that picked the branch (on a tie, rho inside the bounds, it is False).
    is_clipped = clipped < unclipped  # (N, T) bool
    per_token_loss = -torch.where(is_clipped, clipped, unclipped)  # (N, T)
    return per_token_loss, is_clipped


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) per sampled token (N, T): exp(d) - d - 1, d = ref_logp - logp.

    Schulman's k3, as used by DeepSeekMath: unbiased, and non-negative for every sample (exp(d) >= 1 + d), unlike
    k1 = -d. Gradient flows through logp (NOTES trap 9). d is clamped to [-clamp, clamp] before exp so one token
    whose reference log-prob is far below the policy's cannot overflow to inf.
    """
    assert logp.dim() == 2, f"logp must be (N, T), got {tuple(logp.shape)}"
    assert ref_logp.shape == logp.shape, f"ref_logp {tuple(ref_logp.shape)} must match logp {tuple(logp.shape)}"
    assert clamp > 0
    log_ratio = (ref_logp - logp).clamp(-clamp, clamp)  # (N, T)
    # expm1(d) - d rather than exp(d) - d - 1: for small d the latter cancels to float noise that can dip below 0.
    return torch.expm1(log_ratio) - log_ratio  # (N, T)


# ----------------------------------------------------------------------------------------------------------------
# Loss aggregation (NOTES trap 5: one normaliser for the whole optimizer step)
# ----------------------------------------------------------------------------------------------------------------

def _at_least_one(count: float | torch.Tensor) -> float | torch.Tensor:
    """A denominator that turns an empty step (no kept token) into a loss of 0 instead of nan."""
    return count.clamp(min=1.0) if isinstance(count, torch.Tensor) else max(float(count), 1.0)


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
                   total_tokens: float | None = None, total_seqs: float | None = None,
                   max_completion_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss (N, T) over kept tokens (mask (N, T)) to a scalar.

    Modes:
      "token_mean"           sum(loss * mask) / total_tokens. DAPO: every token of the step weighs the same, so
                             long completions are not down-weighted per token.
      "seq_mean_token_mean"  sum_i mean_t(loss_i) / total_seqs. DeepSeekMath's 1/G sum_i 1/|o_i| sum_t: each
                             completion weighs the same, so a long wrong answer is punished less per token.
      "dr_grpo"              sum(loss * mask) / (total_seqs * max_completion_len). Dr. GRPO: a constant
                             normaliser, free of the length bias of 1/|o_i|.
    total_tokens / total_seqs are the counts of the WHOLE optimizer step (every micro-batch, every rank), passed
    by the caller: then the micro-batch results simply add up to the full-batch loss, with no further division
    by the number of accumulation steps. Left as None they default to this call's own counts (one micro-batch).
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")
    assert per_token_loss.dim() == 2, f"per_token_loss must be (N, T), got {tuple(per_token_loss.shape)}"
    assert mask.shape == per_token_loss.shape, f"mask {tuple(mask.shape)} must match loss {tuple(per_token_loss.shape)}"
    n_seq = per_token_loss.shape[0]
    if mode == "token_mean":
        if total_tokens is None:
            total_tokens = mask.to(per_token_loss.dtype).sum()  # ()
        return masked_sum(per_token_loss, mask) / _at_least_one(total_tokens)  # ()
    if total_seqs is None:
        total_seqs = n_seq
    if mode == "seq_mean_token_mean":
        seq_loss = masked_mean(per_token_loss, mask, dim=1)  # (N,)  a fully masked completion contributes 0
        return seq_loss.sum() / _at_least_one(total_seqs)  # ()
    if max_completion_len is None:
        raise ValueError("loss aggregation 'dr_grpo' needs max_completion_len (the generation's max_new_tokens)")
    assert max_completion_len >= 1
    return masked_sum(per_token_loss, mask) / (_at_least_one(total_seqs) * max_completion_len)  # ()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              loss_mask: torch.Tensor, *, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, beta: float = 0.0,
              kl_clamp: float = 10.0, loss_agg: str = "token_mean", total_tokens: float | None = None,
              total_seqs: float | None = None, max_completion_len: int | None = None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of some rows of a step, to be minimised: the clipped surrogate, plus beta times the KL to
    the reference when `ref_logp` is given, reduced by `aggregate_loss` with the WHOLE step's counts, so the
    losses of a step's micro-batches add up to the full-batch loss (trap 5).

    logp (n, T) the current policy's log-probs (with gradient); old_logp (n, T) the sampling policy's (with
    one update per rollout, mu = 1, that is logp.detach(): ratio 1, the plain policy gradient, trap 13);
    ref_logp (n, T) or None; advantages (n,); loss_mask (n, T) the tokens that carry loss.
    Returns (loss (), {"kl": the KL summed over kept tokens, "clipped": kept tokens whose ratio was clipped})."""
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps_low, clip_eps_high)  # (n, T) x2
    kl_sum = 0.0
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp, clamp=kl_clamp)  # (n, T)
        per_token = per_token + beta * kl  # (n, T)
        kl_sum = float(masked_sum(kl.detach(), loss_mask))
    loss = aggregate_loss(per_token, loss_mask, loss_agg, total_tokens=total_tokens, total_seqs=total_seqs,
                          max_completion_len=max_completion_len)  # ()
    return loss, {"kl": kl_sum, "clipped": float(masked_sum(clipped.float(), loss_mask))}


# ----------------------------------------------------------------------------------------------------------------
# Completion masks
# ----------------------------------------------------------------------------------------------------------------

def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """A copy of `mask` (N, T) with the rows of truncated completions (N,) bool zeroed.

    DAPO's overlong filtering: a completion cut at max_new_tokens never got a rating, so it is no evidence of a
    wrong answer and should not be pushed down (NOTES trap 8). Keeps the dtype of `mask`.
    """
    assert mask.dim() == 2, f"mask must be (N, T), got {tuple(mask.shape)}"
    assert truncated.shape == mask.shape[:1] and truncated.dtype == torch.bool, "truncated must be (N,) bool"
    keep_row = ~truncated.unsqueeze(1)  # (N, 1) bool
    return mask & keep_row if mask.dtype == torch.bool else mask * keep_row.to(mask.dtype)  # (N, T)
