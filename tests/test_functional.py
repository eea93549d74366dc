"""Tests of grpo/functional.py: hand-worked numbers, plain-loop references, and one test per GRPO trap it covers.

Trap numbers refer to docs/grpo.md. Shapes follow the legend of grpo/functional.py (B, G, N, T, V, H).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from grpo.functional import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    clipped_surrogate,
    group_advantages,
    kl_k3,
    logprobs_from_hidden,
    mask_truncated,
    masked_mean,
    masked_sum,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _new_saved_numel(fn, inputs: list[torch.Tensor]) -> int:
    """Elements autograd keeps for backward while `fn()` runs, not counting tensors that share storage with
    `inputs` (those already exist); each storage counted once."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    new: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:
            new[ptr] = max(new.get(ptr, 0), t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(new.values())


# ----------------------------------------------------------------------------------------------------------------
# masked_sum / masked_mean
# ----------------------------------------------------------------------------------------------------------------

def test_masked_sum_and_mean_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_sum(x, mask).item() == 3.0
    assert torch.equal(masked_sum(x, mask, dim=1), torch.tensor([3.0, 0.0]))
    assert torch.equal(masked_sum(x, mask, dim=0), torch.tensor([1.0, 2.0, 0.0]))
    assert masked_mean(x, mask).item() == 1.5
    # An all-masked row gives 0, not nan.
    assert torch.equal(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0]))
    assert masked_mean(x, torch.zeros_like(x)).item() == 0.0
    # A bool mask means the same thing.
    assert torch.equal(masked_mean(x, mask.bool(), dim=1), torch.tensor([1.5, 0.0]))


def test_masked_reductions_ignore_nan_and_inf_in_masked_positions():
    x = torch.tensor([[1.0, 2.0, float("nan")], [float("-inf"), 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    assert masked_mean(x, mask).item() == pytest.approx(14.0 / 4)
    assert torch.equal(masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.5]))
    masked_mean(x, mask).backward()
    assert torch.equal(x.grad, mask / 4)  # finite everywhere, zero where masked


# ----------------------------------------------------------------------------------------------------------------
# logprobs_from_hidden
# ----------------------------------------------------------------------------------------------------------------

def _naive_logp_from_hidden(hidden, weight, targets, temperature, bias=None):
    logits = F.linear(hidden, weight, bias).float() / temperature  # (N, T, V): the full tensor we avoid
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)


def test_logprobs_from_hidden_use_the_sampling_temperature():
    # Trap 1: log-probs at temperature 1 are not those of a sampler at temperature 0.7.
    g = _gen(2)
    hidden, weight = torch.randn(2, 4, 8, generator=g), torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (2, 4), generator=g)
    at_07 = logprobs_from_hidden(hidden, weight, targets, temperature=0.7, chunk_tokens=3)
    logits = hidden @ weight.T  # (N, T, V)
    torch.testing.assert_close(at_07, torch.log_softmax(logits / 0.7, dim=-1).gather(-1, targets[..., None])[..., 0])
    assert not torch.allclose(at_07, logprobs_from_hidden(hidden, weight, targets, temperature=1.0), atol=1e-2)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 1024])
def test_logprobs_from_hidden_value_and_gradient_match_full_logits(with_bias, chunk_tokens):
    g = _gen(5)
    n_seq, seq_len, hidden_size, vocab = 3, 5, 8, 60
    hidden = torch.randn(n_seq, seq_len, hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=g, requires_grad=True)
    bias = torch.randn(vocab, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, vocab, (n_seq, seq_len), generator=g)
    upstream = torch.randn(n_seq, seq_len, generator=g)  # an arbitrary downstream loss weighting
    params = [hidden, weight] + ([bias] if with_bias else [])

    logp = logprobs_from_hidden(hidden, weight, targets, temperature=0.7, chunk_tokens=chunk_tokens,
                                lm_head_bias=bias)
    ours = torch.autograd.grad((logp * upstream).sum(), params)
    naive_logp = _naive_logp_from_hidden(hidden, weight, targets, 0.7, bias)
    naive = torch.autograd.grad((naive_logp * upstream).sum(), params)

    assert logp.shape == (n_seq, seq_len) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, naive_logp, atol=1e-5, rtol=1e-5)
    for got, want in zip(ours, naive):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_logprobs_from_hidden_never_holds_full_logits_for_backward():
    # Trap 11: only one chunk of logits may exist at a time, also when gradients are needed.
    n_seq, seq_len, hidden_size, vocab, chunk = 4, 16, 8, 2000, 8
    hidden = torch.randn(n_seq, seq_len, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (n_seq, seq_len))
    kept = _new_saved_numel(lambda: logprobs_from_hidden(hidden, weight, targets, chunk_tokens=chunk),
                            [hidden, weight, targets])
    assert kept <= chunk * vocab  # the naive path keeps n_seq * seq_len * vocab = 128_000


def test_logprobs_from_hidden_bf16_and_no_grad():
    g = _gen(6)
    hidden = torch.randn(2, 9, 16, generator=g).to(torch.bfloat16)
    weight = (torch.randn(100, 16, generator=g) * 0.3).to(torch.bfloat16)
    targets = torch.randint(0, 100, (2, 9), generator=g)
    with torch.no_grad():
        logp = logprobs_from_hidden(hidden, weight, targets, chunk_tokens=4)
    assert logp.dtype == torch.float32 and not logp.requires_grad
    torch.testing.assert_close(logp, _naive_logp_from_hidden(hidden, weight, targets, 1.0), atol=2e-2, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# group_advantages
# ----------------------------------------------------------------------------------------------------------------

def test_group_advantages_hand_values_deepseekmath():
    adv, zero_std = group_advantages(torch.tensor([0.0, 1.0, 0.5]), group_size=3)
    # mean 0.5, population std sqrt(1/6) = 0.40825 (the unbiased std 0.5 would give +-1.0).
    assert adv.dtype == torch.float32 and zero_std.dtype == torch.bool
    torch.testing.assert_close(adv, torch.tensor([-1.2247, 1.2247, 0.0]), atol=1e-3, rtol=0)
    exact = 0.5 / (math.sqrt(1 / 6) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-exact, exact, 0.0]), atol=1e-6, rtol=0)
    assert zero_std.tolist() == [False]


def test_group_advantages_hand_values_dr_grpo():
    adv, zero_std = group_advantages(torch.tensor([0.0, 1.0, 0.5]), group_size=3, scale_by_std=False)
    assert adv.tolist() == [-0.5, 0.5, 0.0]
    assert zero_std.tolist() == [False]


def test_group_advantages_groups_are_contiguous_blocks():
    # Prompt 0 owns rows 0..2 (all correct: no signal), prompt 1 owns rows 3..5.
    adv, zero_std = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]), group_size=3)
    assert zero_std.tolist() == [True, False]
    # Group 1: mean 1/3, deviations [-1/3, 2/3, -1/3], population std sqrt(2/9).
    std = math.sqrt(2 / 9) + 1e-4
    expected = torch.tensor([0.0, 0.0, 0.0, -1 / 3 / std, 2 / 3 / std, -1 / 3 / std])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_equal_graded_rewards_are_exactly_zero(scale_by_std):
    # Trap 6: graded rewards such as 0.7 leave float residue; every equal group must be flagged and give 0.
    adv, zero_std = group_advantages(torch.tensor([0.7, 0.7, 0.7]), group_size=3, scale_by_std=scale_by_std)
    assert zero_std.tolist() == [True]
    assert adv.tolist() == [0.0, 0.0, 0.0]
    # In float32, equal rewards of 77.7 or 123.45 leave a std residue of ~7.6e-6, above the floor: only the
    # float64 computation makes them exactly equal again.
    for value in [0.1, 0.3, 1 / 3, 0.7, 0.9, 0.45, 3.7, 77.7, 123.45]:
        for size in [3, 4, 5, 7, 8, 16]:
            adv, zero_std = group_advantages(torch.full((2 * size,), value), size, scale_by_std=scale_by_std)
            assert zero_std.all(), (value, size)
            assert torch.count_nonzero(adv) == 0, (value, size)


def test_group_advantages_std_floor_and_eps():
    # A std of 1e-7 is below the default floor of 1e-6: zero-variance group...
    rewards = torch.tensor([0.0, 2e-7], dtype=torch.float64)
    adv, zero_std = group_advantages(rewards, 2)
    assert zero_std.tolist() == [True] and adv.tolist() == [0.0, 0.0]
    # ...but a real (if tiny) spread with the floor lowered is kept.
    adv, zero_std = group_advantages(rewards, 2, std_floor=0.0)
    assert zero_std.tolist() == [False] and adv[1] > 0 > adv[0]
    # Above the floor, eps keeps near-equal groups from being blown up to +-1 by noise in the 5th decimal.
    noisy = 0.5 + 1e-5 * torch.rand(64, generator=_gen(9), dtype=torch.float64)
    adv, zero_std = group_advantages(noisy, 8)
    assert not zero_std.any()
    assert 0 < adv.abs().max() < 0.1


def test_group_advantages_are_bounded_and_constant():
    # Population z-scores satisfy |A| <= sqrt(G - 1); advantages never carry gradient into the rewards.
    rewards = torch.rand(40, generator=_gen(10)).requires_grad_()
    adv, _ = group_advantages(rewards, 8)
    assert adv.abs().max() <= math.sqrt(7)
    assert not adv.requires_grad


def _loop_group_advantages(rewards: list[float], group_size: int, scale_by_std: bool, eps: float,
                           std_floor: float) -> tuple[list[float], list[bool]]:
    advantages, zero_std = [], []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / len(group))
        zero_std.append(std < std_floor)
        for r in group:
            if std < std_floor:
                advantages.append(0.0)
            elif scale_by_std:
                advantages.append((r - mean) / (std + eps))
            else:
                advantages.append(r - mean)
    return advantages, zero_std


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("graded", [True, False])
def test_group_advantages_match_plain_loop(scale_by_std, graded):
    g = _gen(11)
    group_size, n_groups = 4, 50
    if graded:  # few distinct values, so many groups are all-equal
        rewards = torch.randint(0, 5, (n_groups * group_size,), generator=g).float() * 0.25 + 0.7
    else:
        rewards = torch.randn(n_groups * group_size, generator=g)
    rewards[: 3 * group_size] = 0.7  # the first three groups are all-equal
    adv, zero_std = group_advantages(rewards, group_size, scale_by_std=scale_by_std)
    want_adv, want_zero = _loop_group_advantages(rewards.tolist(), group_size, scale_by_std, 1e-4, 1e-6)
    assert zero_std.tolist() == want_zero
    assert zero_std[:3].all()
    torch.testing.assert_close(adv, torch.tensor(want_adv, dtype=torch.float32), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# clipped_surrogate
# ----------------------------------------------------------------------------------------------------------------

# (advantage, rho, eps_low, eps_high, expected per-token loss, expected is_clipped)
SURROGATE_CASES = [
    (+1.0, 1.5, 0.2, 0.2, -1.2, True),    # good token pushed past 1 + eps: capped, no gradient
    (-1.0, 1.5, 0.2, 0.2, 1.5, False),    # bad token made likelier: the unclipped term is the min, keeps gradient
    (+1.0, 0.5, 0.2, 0.2, -0.5, False),   # good token made less likely: unclipped, keeps gradient
    (-1.0, 0.5, 0.2, 0.2, 0.8, True),     # bad token pushed below 1 - eps: capped
    (+1.0, 1.0, 0.2, 0.2, -1.0, False),   # on-policy
    (0.0, 1.5, 0.2, 0.2, 0.0, False),     # zero advantage: nothing to clip
    (+1.0, 1.25, 0.2, 0.2, -1.2, True),   # symmetric clip caps rho = 1.25 ...
    (+1.0, 1.25, 0.2, 0.28, -1.25, False),  # ... DAPO's clip-higher (eps_high 0.28) does not
    (+1.0, 1.5, 0.2, 0.28, -1.28, True),
    (-1.0, 0.75, 0.2, 0.28, 0.8, True),   # the low bound stays at 1 - 0.2
    (+2.0, 1.5, 0.2, 0.28, -2.56, True),
    (-2.0, 0.9, 0.2, 0.28, 1.8, False),
]


def test_clipped_surrogate_hand_values_and_zero_gradient_when_clipped():
    adv = torch.tensor([c[0] for c in SURROGATE_CASES])  # (N,)
    rho = torch.tensor([c[1] for c in SURROGATE_CASES])
    want_loss = torch.tensor([c[4] for c in SURROGATE_CASES])
    want_clipped = [c[5] for c in SURROGATE_CASES]
    for row, (_, _, eps_low, eps_high, _, _) in enumerate(SURROGATE_CASES):
        logp = torch.log(rho[row]).reshape(1, 1).requires_grad_()  # (1, 1)
        old_logp = torch.zeros(1, 1)
        loss, is_clipped = clipped_surrogate(logp, old_logp, adv[row:row + 1], eps_low, eps_high)
        assert loss.shape == (1, 1) and is_clipped.dtype == torch.bool
        assert loss.item() == pytest.approx(want_loss[row].item(), abs=1e-6), SURROGATE_CASES[row]
        assert is_clipped.item() == want_clipped[row], SURROGATE_CASES[row]
        loss.sum().backward()
        # d(-rho A)/d logp = -rho A on the unclipped branch; exactly 0 where clipped.
        want_grad = 0.0 if want_clipped[row] else -(rho[row] * adv[row]).item()
        assert logp.grad.item() == pytest.approx(want_grad, abs=1e-6), SURROGATE_CASES[row]


def test_clipped_surrogate_on_policy_value_is_minus_advantage_and_gradient_is_minus_advantage():
    # Trap 13: with mu = 1, old_logp = logp.detach(): rho = 1, loss = -A on every token, gradient -A.
    g = _gen(12)
    logp = (-torch.rand(6, 5, generator=g) * 3).requires_grad_()  # (N, T)
    adv, _ = group_advantages(torch.rand(6, generator=g), group_size=3)  # (N,)
    loss, is_clipped = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.28)
    expected = -adv.unsqueeze(1).expand(6, 5)
    torch.testing.assert_close(loss, expected, atol=0, rtol=0)
    assert not is_clipped.any()
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, expected, atol=0, rtol=0)
    # Advantages sum to 0 within a group, so the aggregated loss reads ~0 while the gradient does not.
    logp.grad = None
    loss, _ = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.28)
    total = aggregate_loss(loss, torch.ones(6, 5), "seq_mean_token_mean")
    total.backward()
    assert abs(total.item()) < 1e-6
    assert logp.grad.abs().max() > 0.01


# ----------------------------------------------------------------------------------------------------------------
# kl_k3
# ----------------------------------------------------------------------------------------------------------------

def test_kl_k3_hand_values():
    logp = torch.zeros(1, 3)
    ref_logp = torch.tensor([[0.0, math.log(2.0), -math.log(2.0)]])
    kl = kl_k3(logp, ref_logp)
    assert kl[0, 0].item() == 0.0
    assert kl[0, 1].item() == pytest.approx(2 - math.log(2) - 1, abs=1e-6)  # 0.3069
    assert kl[0, 2].item() == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)  # 0.1931


def test_kl_k3_non_negative_and_clamped():
    g = _gen(13)
    scale = torch.logspace(-8, 1, 100_000)
    logp = -torch.rand(100_000, generator=g).reshape(1000, 100)
    ref_logp = logp + (torch.randn(100_000, generator=g) * scale).reshape(1000, 100)
    assert (kl_k3(logp, ref_logp) >= 0).all()
    # A log-ratio of +-1000 would overflow exp; clamped to +-10 it stays finite.
    kl = kl_k3(torch.zeros(1, 2), torch.tensor([[1000.0, -1000.0]]))
    assert torch.isfinite(kl).all()
    assert kl[0, 0].item() == pytest.approx(math.exp(10) - 10 - 1, rel=1e-6)
    assert kl[0, 1].item() == pytest.approx(math.exp(-10) + 10 - 1, rel=1e-6)


def test_kl_k3_gradient_flows_through_logp():
    # Trap 9: d k3 / d logp = 1 - exp(ref_logp - logp).
    g = _gen(14)
    logp = (-torch.rand(3, 4, generator=g) * 2).requires_grad_()
    ref_logp = -torch.rand(3, 4, generator=g) * 2
    kl_k3(logp, ref_logp).sum().backward()
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref_logp - logp.detach()))


def test_kl_k3_expectation_is_the_exact_kl():
    # k3 is unbiased: sum_x p(x) k3(x) = KL(p || q) when x ~ p. Checked exactly over a small vocabulary.
    g = _gen(15)
    logp_all = torch.log_softmax(torch.randn(4, 20, generator=g), dim=-1)  # policy, 4 positions x 20 tokens
    logq_all = torch.log_softmax(torch.randn(4, 20, generator=g), dim=-1)  # reference
    expected_k3 = (logp_all.exp() * kl_k3(logp_all, logq_all)).sum(-1)  # (4,)
    exact_kl = (logp_all.exp() * (logp_all - logq_all)).sum(-1)  # (4,)
    torch.testing.assert_close(expected_k3, exact_kl, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# aggregate_loss
# ----------------------------------------------------------------------------------------------------------------

def test_aggregate_loss_hand_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "token_mean").item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    assert aggregate_loss(loss, mask).item() == pytest.approx(7 / 3)  # the default mode
    assert aggregate_loss(loss, mask, "token_mean", total_tokens=7).item() == pytest.approx(1.0)
    assert aggregate_loss(loss, mask, "seq_mean_token_mean").item() == pytest.approx((1.5 + 4.0) / 2)
    assert aggregate_loss(loss, mask, "seq_mean_token_mean", total_seqs=5).item() == pytest.approx(5.5 / 5)
    assert aggregate_loss(loss, mask, "dr_grpo", max_completion_len=3).item() == pytest.approx(7 / 6)
    assert aggregate_loss(loss, mask, "dr_grpo", total_seqs=4, max_completion_len=10).item() == pytest.approx(7 / 40)


def test_aggregate_loss_rejects_bad_arguments():
    loss, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError) as excinfo:
        aggregate_loss(loss, mask, "bnpo")
    for mode in LOSS_AGGREGATIONS:
        assert mode in str(excinfo.value)
    with pytest.raises(ValueError, match="max_completion_len"):
        aggregate_loss(loss, mask, "dr_grpo")


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_loss_of_an_empty_step_is_zero(mode):
    # DAPO's truncation masking can mask every token of a step: the loss is 0, not nan.
    loss = torch.ones(2, 3, requires_grad=True)
    value = aggregate_loss(loss, torch.zeros(2, 3), mode, max_completion_len=3)
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(loss.grad) == 0


def _ragged_batch():
    """6 sequences, T = 7, ragged masks (one fully masked), and a per-token loss built from a shared parameter."""
    g = _gen(16)
    lengths = [7, 1, 4, 0, 5, 2]
    mask = (torch.arange(7).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()  # (N, T)
    features = torch.randn(6, 7, generator=g)  # (N, T)
    weight = torch.randn(7, generator=g).requires_grad_()  # (T,) shared by every micro-batch
    return mask, features, weight


def _per_token_loss(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.tanh(features * weight) + (features * weight) ** 2  # (n, T), non-linear in the parameter


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("split", [(1, 2, 3), (3, 2, 1), (2, 1, 3)])
def test_aggregate_loss_micro_batches_add_up_to_the_full_batch(mode, split):
    # Trap 5: with the step's totals passed in, micro-batch losses (and gradients) simply add up.
    mask, features, weight = _ragged_batch()
    totals = dict(total_tokens=mask.sum().item(), total_seqs=6, max_completion_len=7)

    full = aggregate_loss(_per_token_loss(features, weight), mask, mode, **totals)
    (full_grad,) = torch.autograd.grad(full, weight)

    summed, summed_grad = 0.0, torch.zeros(7)
    for rows in torch.arange(6).split(list(split)):
        part = aggregate_loss(_per_token_loss(features[rows], weight), mask[rows], mode, **totals)
        (part_grad,) = torch.autograd.grad(part, weight)
        summed, summed_grad = summed + part.item(), summed_grad + part_grad  # gradient accumulation

    assert summed == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(summed_grad, full_grad, atol=1e-6, rtol=1e-5)
    assert full_grad.abs().sum() > 0


def test_a_per_micro_batch_normaliser_changes_the_gradient_and_the_step_totals_do_not():
    # Trap 5, by its effect on the gradient. The reference is one backward over the whole batch (token_mean over
    # this call's own kept tokens). Accumulating micro-batches that each divide by their own token count (and are
    # averaged, as plain gradient accumulation does) weighs the tokens of short micro-batches more: another
    # gradient. Passing the step's total instead gives the reference back, whatever the split.
    mask, features, weight = _ragged_batch()
    (full_grad,) = torch.autograd.grad(aggregate_loss(_per_token_loss(features, weight), mask, "token_mean"), weight)
    splits = torch.arange(6).split([3, 2, 1])  # 12, 5 and 2 kept tokens

    def accumulated(**totals) -> torch.Tensor:
        weight.grad = None
        for rows in splits:
            part = aggregate_loss(_per_token_loss(features[rows], weight), mask[rows], "token_mean", **totals)
            (part if totals else part / len(splits)).backward()
        return weight.grad.clone()

    per_micro_batch = accumulated()
    assert (per_micro_batch - full_grad).abs().max() > 0.1 * full_grad.abs().max()
    torch.testing.assert_close(accumulated(total_tokens=mask.sum().item()), full_grad, atol=1e-6, rtol=1e-5)


def _loop_aggregate(loss: list[list[float]], mask: list[list[float]], mode: str, total_tokens: float,
                    total_seqs: float, max_completion_len: int) -> float:
    if mode == "token_mean":
        return sum(l * m for row_l, row_m in zip(loss, mask) for l, m in zip(row_l, row_m)) / total_tokens
    if mode == "dr_grpo":
        return (sum(l * m for row_l, row_m in zip(loss, mask) for l, m in zip(row_l, row_m))
                / (total_seqs * max_completion_len))
    total = 0.0
    for row_l, row_m in zip(loss, mask):
        kept = sum(row_m)
        total += sum(l * m for l, m in zip(row_l, row_m)) / kept if kept > 0 else 0.0
    return total / total_seqs


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_loss_matches_plain_loop(mode):
    g = _gen(17)
    loss = torch.randn(12, 9, generator=g)
    mask = (torch.rand(12, 9, generator=g) < 0.6).float()
    mask[3] = 0.0  # one fully masked sequence
    got = aggregate_loss(loss, mask, mode, total_tokens=80.0, total_seqs=20, max_completion_len=9)
    want = _loop_aggregate(loss.tolist(), mask.tolist(), mode, 80.0, 20, 9)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # The defaults are this call's own counts.
    got = aggregate_loss(loss, mask, mode, max_completion_len=9)
    want = _loop_aggregate(loss.tolist(), mask.tolist(), mode, mask.sum().item(), 12, 9)
    assert got.item() == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# mask_truncated
# ----------------------------------------------------------------------------------------------------------------

def test_mask_truncated_zeroes_rows_and_returns_a_new_tensor():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    before = mask.clone()
    truncated = torch.tensor([False, True, False])
    out = mask_truncated(mask, truncated)
    assert out.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert out.dtype == mask.dtype and out.data_ptr() != mask.data_ptr()
    assert torch.equal(mask, before)
    out_bool = mask_truncated(mask.bool(), truncated)
    assert out_bool.dtype == torch.bool and out_bool.tolist() == out.bool().tolist()


# ----------------------------------------------------------------------------------------------------------------
# Contracts: shape asserts and no mutation of arguments
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: masked_mean(torch.ones(2, 3), torch.ones(3, 2)),
    lambda: logprobs_from_hidden(torch.ones(2, 3, 4), torch.ones(5, 6), torch.zeros(2, 3, dtype=torch.long)),
    lambda: group_advantages(torch.ones(7), group_size=3),
    lambda: clipped_surrogate(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3)),
    lambda: kl_k3(torch.ones(2, 3), torch.ones(3, 2)),
    lambda: aggregate_loss(torch.ones(2, 3), torch.ones(2, 4), "token_mean"),
    lambda: mask_truncated(torch.ones(2, 3), torch.tensor([1, 0])),  # truncated not bool
])
def test_shape_and_dtype_asserts(call):
    with pytest.raises(AssertionError):
        call()


def test_no_function_mutates_its_arguments():
    g = _gen(18)
    targets = torch.randint(0, 10, (3, 4), generator=g)
    hidden, weight = torch.randn(3, 4, 6, generator=g), torch.randn(10, 6, generator=g)
    logp, old_logp = -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g)
    rewards, mask = torch.rand(3, generator=g), torch.ones(3, 4)
    truncated = torch.tensor([True, False, False])
    args = [targets, hidden, weight, logp, old_logp, rewards, mask, truncated]
    snapshots = [a.clone() for a in args]
    masked_sum(logp, mask), masked_mean(logp, mask, dim=1)
    logprobs_from_hidden(hidden, weight, targets, 0.7, chunk_tokens=5)
    adv, _ = group_advantages(rewards, 3)
    clipped_surrogate(logp, old_logp, adv)
    kl_k3(logp, old_logp)
    aggregate_loss(logp, mask, "dr_grpo", max_completion_len=4)
    mask_truncated(mask, truncated)
    for arg, snapshot in zip(args, snapshots):
        assert torch.equal(arg, snapshot)
