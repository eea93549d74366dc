"""Scoring completions (plain and fast, held equal) and accumulating the GRPO gradient over micro-batches
(grpo/train.py phase 6), on a tiny model."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from grpo.config import GRPOConfig
from grpo.functional import grpo_loss
from grpo.logprobs import completion_logprobs, completion_logprobs_fast
from grpo.sampler import sample


def _rollout(model, G=3, common=0):
    """G completions of 3 ragged prompts; with `common`, the prompts start with the same `common` tokens."""
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(2, 128, (common,), generator=g).tolist()
    prompts = [prefix + torch.randint(2, 128, (n,), generator=g).tolist() for n in (6, 2, 9)]
    return sample(model, prompts, group_size=G, max_new_tokens=10, eos_ids=[1, 2, 3], pad_id=1,
                  temperature=1.3, generator=torch.Generator().manual_seed(5))


def accumulate(logprobs_of, micro_batches, advantages, mask, old_logp, ref_logp, cfg: GRPOConfig, max_len: int):
    """Phase 6 of grpo/train.py for one pass (mu = 1 unless old_logp is given): backward every micro-batch's
    loss, normalised by the whole batch's counts. Returns the summed loss, KL and clipped-token count."""
    sums = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
    for rows in micro_batches:
        logp = logprobs_of(rows)  # (n, T)
        old = old_logp[rows] if old_logp is not None else logp.detach()
        loss, stats = grpo_loss(logp, old, ref_logp[rows] if ref_logp is not None else None, advantages[rows],
                                mask[rows], clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                                beta=cfg.beta, kl_clamp=cfg.kl_clamp, loss_agg=cfg.loss_agg,
                                total_tokens=float(mask.sum()), total_seqs=float(mask.shape[0]),
                                max_completion_len=max_len)
        loss.backward()
        sums = {"loss": sums["loss"] + float(loss.detach()), "kl": sums["kl"] + stats["kl"],
                "clipped": sums["clipped"] + stats["clipped"]}
    return sums


def test_completion_logprobs_equal_minus_cross_entropy_of_the_full_logits():
    model = tiny_model()
    r = _rollout(model)
    logp = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                               temperature=1.3, chunk_tokens=7)
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask.long()], 1)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    ref = -F.cross_entropy((logits[:, P - 1:P + T - 1] / 1.3).reshape(-1, logits.shape[-1]),
                           r.completion_ids.reshape(-1), reduction="none").view(-1, T)
    m = r.completion_mask.bool()
    assert torch.allclose(logp[m], ref[m], atol=1e-5)
    assert torch.allclose(logp[m], r.logp[m], atol=1e-4)  # and the sampler's own bookkeeping agrees


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_gradient_does_not_depend_on_the_micro_batch_split(loss_agg, beta):
    model = tiny_model()
    r = _rollout(model)
    N = r.completion_ids.shape[0]
    advantages = torch.linspace(-1.5, 1.5, N)
    cfg = GRPOConfig(loss_agg=loss_agg, beta=beta)
    ref_logp = None
    if beta > 0:  # a reference that differs from the policy, so the KL term has a gradient
        ref_logp = r.logp + 0.3 * torch.randn(r.logp.shape, generator=torch.Generator().manual_seed(2))
    # an old policy that differs too, so some ratios are clipped
    old_logp = r.logp + 0.4 * torch.randn(r.logp.shape, generator=torch.Generator().manual_seed(3))

    def grads(micro: int):
        model.zero_grad(set_to_none=True)
        batches = [slice(i, i + micro) for i in range(0, N, micro)]
        sums = accumulate(
            lambda rows: completion_logprobs(model, r.prompt_ids[rows], r.prompt_mask[rows],
                                             r.completion_ids[rows], r.completion_mask[rows]),
            batches, advantages, r.completion_mask, old_logp, ref_logp, cfg, max_len=10)
        return [p.grad.clone() for p in model.parameters()], sums

    full, full_sums = grads(N)
    assert full_sums["clipped"] > 0
    for micro in (1, 2, 4):
        split, sums = grads(micro)
        assert abs(sums["loss"] - full_sums["loss"]) < 1e-5
        for a, b in zip(full, split):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_the_fast_scorer_gives_the_plain_logprobs_and_gradients():
    model = tiny_model()
    r = _rollout(model, G=3, common=5)  # prompts that start alike, as a template makes them
    weights = torch.randn(r.completion_ids.shape, generator=torch.Generator().manual_seed(4)) * r.completion_mask

    def run(rows, scorer, **kw):
        model.zero_grad(set_to_none=True)
        logp = scorer(model, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows],
                      r.completion_mask[rows], temperature=1.3, **kw)
        (logp * weights[rows]).sum().backward()
        return logp.detach(), [p.grad.clone() for p in model.parameters()]

    # whole batch, and a micro-batch that starts and ends in the middle of groups
    for rows in (slice(0, 9), slice(2, 7)):
        base, base_grads = run(rows, completion_logprobs)
        # trimmed columns; prompts shared by their rows; their common prefix run once, with and without that
        for kw in ({}, {"prompt_index": r.prompt_index[rows]}, {"shared_prefix": True},
                   {"prompt_index": r.prompt_index[rows], "shared_prefix": True}):
            fast, fast_grads = run(rows, completion_logprobs_fast, **kw)
            m = r.completion_mask[rows].bool()
            assert torch.allclose(base[m], fast[m], atol=1e-5)
            for a, b in zip(base_grads, fast_grads):
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_token_budget_micro_batches_pack_rows_by_their_real_length():
    from grpo.batching import plan_micro_batches

    prompt_mask = torch.tensor([[0, 0, 1, 1]] * 3 + [[1, 1, 1, 1]] * 3)  # prompts of 2, 2, 2, 4, 4, 4 tokens
    completion_mask = torch.tensor([[1, 0, 0]] * 3 + [[1, 1, 1]] * 3).float()  # completions of 1 and 3 tokens
    assert plan_micro_batches(prompt_mask, completion_mask, 4) == [slice(0, 4), slice(4, 8)]
    # budget 9: rows 0-2 cost 3 x (2 + 1) = 9; row 3 alone costs 7, with row 4: 2 x 7 = 14 > 9
    assert plan_micro_batches(prompt_mask, completion_mask, 4, token_budget=9) == \
        [slice(0, 3), slice(3, 4), slice(4, 5), slice(5, 6)]
    assert plan_micro_batches(prompt_mask, completion_mask, 4, token_budget=5) == \
        [slice(i, i + 1) for i in range(6)]  # a row over budget goes alone
    assert plan_micro_batches(prompt_mask, completion_mask, 4, token_budget=100) == [slice(0, 6)]


def test_token_budget_micro_batches_give_the_full_batch_gradient():
    from grpo.batching import plan_micro_batches

    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (6, 2, 9)]
    r = sample(model, prompts, group_size=3, max_new_tokens=10, eos_ids=list(range(2, 30)), pad_id=1,
               temperature=1.3, generator=torch.Generator().manual_seed(5))  # many EOS ids: ragged lengths
    N = r.completion_ids.shape[0]
    assert r.completion_lengths.min() < r.completion_lengths.max()  # ragged: the trimming has work to do
    advantages = torch.linspace(-1.5, 1.5, N)
    cfg = GRPOConfig(loss_agg="token_mean", beta=0.1)
    ref_logp = r.logp + 0.3 * torch.randn(r.logp.shape, generator=torch.Generator().manual_seed(2))

    def grads(batches):
        model.zero_grad(set_to_none=True)
        sums = accumulate(
            lambda rows: completion_logprobs_fast(model, r.prompt_ids[rows], r.prompt_mask[rows],
                                                  r.completion_ids[rows], r.completion_mask[rows],
                                                  prompt_index=r.prompt_index[rows]),
            batches, advantages, r.completion_mask, None, ref_logp, cfg, max_len=10)
        return [p.grad.clone() for p in model.parameters()], sums

    full, full_sums = grads([slice(0, N)])
    for budget in (12, 30, 60):
        batches = plan_micro_batches(r.prompt_mask, r.completion_mask, N, token_budget=budget)
        assert len(batches) > 1
        split, sums = grads(batches)
        assert abs(sums["loss"] - full_sums["loss"]) < 1e-5 and abs(sums["kl"] - full_sums["kl"]) < 1e-4
        for a, b in zip(full, split):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_the_fast_scorer_trims_padding_without_changing_a_value():
    model = tiny_model()
    r = _rollout(model)
    # widen the batch with columns no row uses: extra left padding and extra right padding
    T = r.completion_ids.shape[1]
    prompt_ids = torch.cat([torch.ones(len(r.prompt_ids), 5, dtype=torch.long), r.prompt_ids], 1)
    prompt_mask = torch.cat([torch.zeros(len(r.prompt_ids), 5, dtype=torch.long), r.prompt_mask], 1)
    completion_ids = torch.cat([r.completion_ids, torch.ones(len(r.prompt_ids), 4, dtype=torch.long)], 1)
    completion_mask = torch.cat([r.completion_mask, torch.zeros(len(r.prompt_ids), 4)], 1)
    wide = completion_logprobs_fast(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    narrow = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    assert wide.shape == (len(r.prompt_ids), T + 4) and (wide[:, T:] == 0).all()
    m = r.completion_mask.bool()
    assert torch.allclose(wide[:, :T][m], narrow[m], atol=1e-6)


# ---- the sampler's bf16 copy of fp32 master weights (SamplingConfig.decode_weights) --------------------------
def _autocast_policy(model):
    from grpo.policy import Policy

    from conftest import CharTokenizer

    return Policy(model=model, tokenizer=CharTokenizer(), eos_ids=[1], pad_id=0, autocast_dtype=torch.bfloat16)


def test_decode_copy_is_bf16_keeps_buffers_and_follows_the_master_weights():

    model = tiny_model(tie_word_embeddings=True)
    policy = _autocast_policy(model)
    assert policy.decode_model("auto") == (model, True) and policy.decode_copy is None  # auto: CUDA only
    assert policy.decode_model("master") == (model, True)
    copy_, under_autocast = policy.decode_model("copy")
    assert copy_ is not model and not under_autocast and not copy_.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in copy_.parameters())
    assert copy_.get_output_embeddings().weight is copy_.get_input_embeddings().weight  # still tied
    for (name, ours), (_, master) in zip(copy_.named_buffers(), model.named_buffers()):
        assert ours.dtype == master.dtype and torch.equal(ours, master), name  # rotary frequencies stay fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights are untouched
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(2.0)  # an optimizer step, say
    stale, _ = policy.decode_model("copy")
    assert not torch.equal(stale.get_input_embeddings().weight, model.get_input_embeddings().weight.to(torch.bfloat16))
    policy.weights_changed()  # what the trainers call after every optimizer step
    again, _ = policy.decode_model("copy")
    assert again is copy_  # made once, refreshed in place
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight.to(torch.bfloat16))
    no_autocast = _autocast_policy(model)
    no_autocast.autocast_dtype = None
    assert no_autocast.decode_model("copy") == (model, True)  # nothing to copy without autocast


def test_generate_from_the_decode_copy_matches_the_autocast_training_forward():
    from conftest import decode_weights_gaps

    policy = _autocast_policy(tiny_model())
    diffs = decode_weights_gaps(policy, ("copy", "master"))  # the copy against the training forward
    assert policy.decode_copy is not None
    assert diffs["copy"] < max(0.05, 1.5 * diffs["master"]), diffs  # bf16 rounding, no more than autocast's


def test_decode_weights_is_checked():
    from grpo.config import ConfigError, SamplingConfig

    with pytest.raises(ConfigError, match="decode_weights"):
        SamplingConfig(decode_weights="fp8")
