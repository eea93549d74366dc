"""Both samplers against Hugging Face: greedy tokens equal `generate`'s, log-probs equal a full forward. The
plain loop (grpo/sampler.py) and the fast one (grpo/fast/, with either cache) pass the same tests; the fast
decoder's own machinery (compaction, split cache, packed weights) is tested further down."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from grpo.fast import sample as fast_sample
from grpo.sampler import StopStrings, filter_logits, left_pad
from grpo.sampler import sample as reference_sample
from grpo.scaffold import Scaffold, sample_scaffolded

PAD = 0
EOS = 1
DECODERS = {"reference": reference_sample,
            "fast-static": lambda *a, **kw: fast_sample(*a, cache_impl="static", **kw),
            "fast-dynamic": lambda *a, **kw: fast_sample(*a, cache_impl="dynamic", **kw)}
each_decoder = pytest.mark.parametrize("decoder", list(DECODERS))


def ragged_prompts(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 12, 5]
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def _stopping_tokens(free: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """From a greedy run without EOS (N >= 3 rows, T steps), two (step, row, token) that end rows unevenly when
    taken as EOS ids: `early` first appears in one row only, at step >= 1; `late` in another row only, at a later
    step before the last; every other row contains neither, so it runs to the end."""
    N, T = free.shape
    assert N >= 3
    firsts = []  # (step, row, token) for each token that occurs in exactly one row, at its first occurrence
    for tok in free.unique().tolist():
        rows = (free == tok).any(1).nonzero().flatten().tolist()
        if len(rows) == 1:
            firsts.append((int((free[rows[0]] == tok).nonzero()[0]), rows[0], tok))
    early = min(f for f in firsts if f[0] >= 1)
    late = max(f for f in firsts if f[1] != early[1] and early[0] < f[0] < T - 1)
    return early, late


@each_decoder
def test_greedy_matches_hf_generate_with_ragged_left_padding(decoder):
    model = tiny_model(initializer_range=0.5)  # large weights: greedy rows wander instead of repeating a token
    prompts = ragged_prompts()
    T = 20
    ids, mask = left_pad(prompts, PAD)
    # Without EOS: every row runs to T, token for token as `generate`.
    ours = DECODERS[decoder](model, prompts, group_size=1, max_new_tokens=T, eos_ids=[], pad_id=PAD, greedy=True)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, do_sample=False,
                          eos_token_id=None, pad_token_id=PAD, min_new_tokens=T)[:, ids.shape[1]:]
    assert torch.equal(ours.completion_ids, free)
    # With two EOS ids that the model really emits, one row ends early, one late, the others never: `generate`
    # stops each row at its first EOS and pads after it; so must we, with the same tokens, the same lengths.
    early, late = _stopping_tokens(free)
    eos = [early[2], late[2]]
    ours = DECODERS[decoder](model, prompts, group_size=1, max_new_tokens=T, eos_ids=eos, pad_id=PAD, greedy=True)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, do_sample=False,
                        eos_token_id=eos, pad_token_id=PAD)[:, ids.shape[1]:]
    hf_lengths = [next((t + 1 for t, tok in enumerate(row) if tok in eos), T) for row in hf.tolist()]
    expected = [T] * len(prompts)
    expected[early[1]], expected[late[1]] = early[0] + 1, late[0] + 1
    assert hf_lengths == expected  # the case is what it says: EOS inside the span, rows ending apart
    assert ours.completion_lengths.tolist() == hf_lengths
    assert ours.truncated.tolist() == [n == T for n in hf_lengths]
    assert torch.equal(ours.completion_ids, hf)  # up to and including each EOS, then PAD as `generate` pads


@each_decoder
def test_group_shares_prefill_and_greedy_rows_agree(decoder):
    model = tiny_model()
    prompts = ragged_prompts()
    run = DECODERS[decoder]
    single = run(model, prompts, group_size=1, max_new_tokens=10, eos_ids=[EOS], pad_id=PAD, greedy=True)
    grouped = run(model, prompts, group_size=3, max_new_tokens=10, eos_ids=[EOS], pad_id=PAD, greedy=True)
    assert grouped.completion_ids.shape[0] == 12
    for b in range(4):
        for g in range(3):
            assert torch.equal(grouped.completion_ids[b * 3 + g], single.completion_ids[b])
        assert torch.equal(grouped.prompt_ids[b * 3], single.prompt_ids[b])


@each_decoder
def test_sampler_logprobs_match_a_full_forward_at_temperature(decoder):
    model = tiny_model()
    prompts = ragged_prompts()
    temperature = 0.7
    gen = torch.Generator().manual_seed(3)
    r = DECODERS[decoder](model, prompts, group_size=2, max_new_tokens=12, eos_ids=[EOS], pad_id=PAD,
               temperature=temperature, generator=gen)
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask.long()], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    pred = logits[:, P - 1:P + T - 1] / temperature
    ref = -F.cross_entropy(pred.reshape(-1, pred.shape[-1]), r.completion_ids.reshape(-1),
                           reduction="none").view_as(r.logp)
    m = r.completion_mask.bool()
    assert torch.allclose(r.logp[m], ref[m], atol=1e-4)


@each_decoder
def test_eos_is_kept_in_mask_and_rows_stop_independently_with_pad_equal_eos(decoder):
    # Trap 4. Two EOS ids the model really emits (found in a run without EOS), one of them also the pad id (as in
    # SmolLM2): one row ends early, one later, the others run to the end. The mask must come from where each row
    # stopped, so it keeps the EOS even though that EOS equals the padding after it.
    model = tiny_model(initializer_range=0.5)
    prompts = ragged_prompts()
    T = 15
    free = DECODERS[decoder](model, prompts, group_size=1, max_new_tokens=T, eos_ids=[], pad_id=0, greedy=True)
    early, late = _stopping_tokens(free.completion_ids)
    pad = early[2]
    r = DECODERS[decoder](model, prompts, group_size=1, max_new_tokens=T, eos_ids=[early[2], late[2]], pad_id=pad,
                          greedy=True)
    assert r.completion_ids.shape == (4, T)  # a row still running keeps the batch going
    lengths = [T] * 4
    lengths[early[1]], lengths[late[1]] = early[0] + 1, late[0] + 1
    assert r.completion_lengths.tolist() == lengths  # each row stopped at its own first EOS, EOS included
    for row, n in enumerate(lengths):
        assert r.completion_mask[row].tolist() == [1.0] * n + [0.0] * (T - n)
        assert r.completion_ids[row, :n].tolist() == free.completion_ids[row, :n].tolist()  # what the model wrote
        assert (r.completion_ids[row, n:] == pad).all()
        assert bool(r.truncated[row]) == (n == T)
    stopped = r.completion_ids[early[1]]
    assert stopped[early[0]] == pad and r.completion_mask[early[1], early[0]] == 1  # the EOS == pad is kept
    assert (r.logp[r.completion_mask.bool()] < 0).all()  # kept tokens carry their log-probs, EOS included
    assert (r.logp * (1 - r.completion_mask)).abs().sum() == 0


@each_decoder
def test_stop_on_eos_with_forced_model(decoder):
    model = tiny_model()
    # an LM head whose only opinion is "EOS" (id 1): every row stops at its first token
    head = torch.nn.Linear(32, 128, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[EOS] = 50.0
    model.lm_head = head
    r = DECODERS[decoder](model, ragged_prompts(), group_size=2, max_new_tokens=10, eos_ids=[EOS], pad_id=EOS,
               temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert r.completion_ids.shape == (8, 1)
    assert r.completion_mask.sum() == 8 and not r.truncated.any()


def test_the_two_decoders_draw_the_same_samples_while_no_row_has_stopped():
    # The same generator and one uniform per row per step on the CPU: the fast decoder's prefill sharing, cache
    # and packed weights change nothing a draw can see (without EOS no row is dropped, so the draws line up).
    model = tiny_model()
    runs = [DECODERS[name](model, ragged_prompts(), group_size=3, max_new_tokens=12, eos_ids=[], pad_id=PAD,
                           temperature=1.0, generator=torch.Generator().manual_seed(7)) for name in DECODERS]
    for other in runs[1:]:
        assert torch.equal(runs[0].completion_ids, other.completion_ids)
        assert torch.allclose(runs[0].logp, other.logp, atol=1e-5)
    assert len(set(runs[0].completion_ids[:3].flatten().tolist())) > 3  # sampled, not one repeated token


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    p = logits.softmax(-1)[0]  # [0.644, 0.237, 0.087, 0.032]
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.644 < 0.7, so the second token is needed
    assert float(p[0]) < 0.7
    assert (~torch.isinf(filter_logits(logits, top_p=0.5))).tolist() == [[True, False, False, False]]


@each_decoder
def test_sampling_is_seeded(decoder):
    model = tiny_model()
    a = DECODERS[decoder](model, ragged_prompts(), group_size=2, max_new_tokens=8, eos_ids=[EOS], pad_id=PAD,
               generator=torch.Generator().manual_seed(11))
    b = DECODERS[decoder](model, ragged_prompts(), group_size=2, max_new_tokens=8, eos_ids=[EOS], pad_id=PAD,
               generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.completion_ids, b.completion_ids)


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_end_a_row_at_the_token_that_completes_them():
    stop = StopStrings(_CharTokenizer(), ["cd"])
    ids = torch.tensor([[0, 1, 2, 3, 4], [3, 2, 3, 3, 3]])  # row 0 spells "abcde", row 1 "dcddd"
    assert stop(ids, [0, 1], 1) == []  # "ab", "dc"
    assert stop(ids, [0, 1], 2) == [1]  # "abc", "dcd": row 1 has just completed "cd"
    assert stop(ids, [0], 3) == [0]  # "abcd"


@each_decoder
def test_sampler_stops_rows_on_a_stop_string(decoder):
    model = tiny_model(vocab_size=26)
    prompts = [[2, 3, 4], [5, 6]]
    free = DECODERS[decoder](model, prompts, group_size=1, max_new_tokens=12, eos_ids=[25], pad_id=0, greedy=True)
    text = _CharTokenizer().decode(free.completion_ids[0].tolist())
    target = text[3:5]  # a two-character string that the greedy completion of row 0 contains
    stopped = DECODERS[decoder](model, prompts, group_size=1, max_new_tokens=12, eos_ids=[25], pad_id=0, greedy=True,
                     stop=StopStrings(_CharTokenizer(), [target]))
    n = int(stopped.completion_mask[0].sum())
    kept = _CharTokenizer().decode(stopped.completion_ids[0, :n].tolist())
    assert kept.endswith(target) and target not in kept[:-1]
    assert not stopped.truncated[0]



class _AsciiTokenizer:
    """One token per character (id = code point), enough for headings like '<a>'."""

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _texts(rollout):
    return [_AsciiTokenizer().decode(ids[: int(m.sum())].tolist())
            for ids, m in zip(rollout.completion_ids, rollout.completion_mask)]


def test_scaffold_writes_headings_around_the_models_own_text():
    model = tiny_model(vocab_size=128)
    scaffold = Scaffold(_AsciiTokenizer(), [("<a>", "</a>"), ("<b>", "</b>")], budgets=[5, 3])
    r = sample_scaffolded(model, [[60, 97, 62, 10], [60, 97, 62, 10, 120]], scaffold, group_size=2,
                          max_new_tokens=40, eos_ids=[EOS],
               pad_id=PAD, temperature=1.0, generator=torch.Generator().manual_seed(3))
    for row, text in enumerate(_texts(r)):
        # a random model writes neither closing tag, so every body is cut at its budget
        rest = text[5:]  # after a 5-token body
        assert rest[:9] == "\n</a>\n<b>" and rest[9] == "\n"
        assert rest[13:] == "\n</b>", text
        assert not r.truncated[row]
        sampled = r.completion_ids[row, :5]
        assert not torch.isin(sampled, torch.tensor([EOS])).any()  # EOS is never drawn inside a section
    # forced tokens carry the model's log-probs like sampled ones (finite, <= 0)
    assert torch.isfinite(r.logp).all() and (r.logp <= 0).all()


def test_scaffold_lets_the_model_close_a_section_itself():
    model = tiny_model(vocab_size=128)
    # an LM head that always says ">" (62): with sections ("<x>", ">") the model closes each section itself
    head = torch.nn.Linear(32, 128, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[62] = 50.0
    model.lm_head = head
    scaffold = Scaffold(_AsciiTokenizer(), [("<x>", ">"), ("<y>", ">")], budgets=[10, 10])
    r = sample_scaffolded(model, [[1, 2]], scaffold, group_size=1, max_new_tokens=30, eos_ids=[EOS], pad_id=PAD,
                          greedy=True)
    assert _texts(r) == [">\n<y>\n>"]  # closed by the model at once, opening forced, closed again: done
    assert not r.truncated[0]


def test_scaffold_restricts_a_section_to_allowed_tokens():
    model = tiny_model(vocab_size=128)
    digits = [ord(d) for d in "12345"]
    scaffold = Scaffold(_AsciiTokenizer(), [("<a>", "</a>"), ("<r>", "</r>")], budgets=[4, 1],
                        allowed=[None, digits])
    r = sample_scaffolded(model, [[60, 97, 62, 10]] * 3, scaffold, group_size=4, max_new_tokens=30,
                          eos_ids=[EOS], pad_id=PAD,
               temperature=1.0, generator=torch.Generator().manual_seed(5))
    ratings = set()
    for text in _texts(r):
        head, _, rest = text.partition("<r>\n")
        assert rest[1:] == "\n</r>" and rest[0] in "12345", text
        ratings.add(rest[0])
    assert len(ratings) > 1  # drawn from the model, not fixed


# ---- the decode engines (grpo/fast/decode.py): our slot cache against Hugging Face's paths -----------------------
TINY_LLAMA = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True)


def test_the_static_path_uses_our_slot_decoder_for_llama_and_qwen2():
    from grpo.fast.decode import HFDecoder, SlotDecoder, make_decoder

    assert isinstance(make_decoder(tiny_model(), "static", 8, 8, None), SlotDecoder)
    assert isinstance(make_decoder(tiny_model(**TINY_LLAMA), "static", 8, 8, None), SlotDecoder)
    assert isinstance(make_decoder(tiny_model(), "dynamic", 8, 8, None), HFDecoder)
    assert not make_decoder(tiny_model(), "static", 8, 8, None).uses_graphs  # CPU: eager
    assert make_decoder(tiny_model(), "static", 8, 8, None)._fused_norm  # the one-kernel RMSNorm matches the module
    assert make_decoder(tiny_model(**TINY_LLAMA), "static", 8, 8, None)._fused_norm


def test_slot_decoder_matches_hf_generate_on_a_llama_with_grouped_query_attention():
    model = tiny_model(**TINY_LLAMA)  # 6 query heads share 2 key/value heads (r = 3)
    prompts = ragged_prompts()
    ours = fast_sample(model, prompts, group_size=2, max_new_tokens=16, eos_ids=[], pad_id=PAD, greedy=True)
    ids, mask = left_pad(prompts, PAD)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                        pad_token_id=PAD, eos_token_id=None, min_new_tokens=16)[:, ids.shape[1]:]
    assert torch.equal(ours.completion_ids[::2], hf) and torch.equal(ours.completion_ids[1::2], hf)
    assert not ours.completion_mask.eq(0).any()  # no EOS id: every row runs to the end


def _first_token_per_row_position(completions: torch.Tensor) -> int:
    """A token id that appears in some rows early, in others late or never: an EOS that ends rows unevenly."""
    best, spread = None, -1
    for tok in completions.unique().tolist():
        firsts = [(row == tok).nonzero()[0].item() if (row == tok).any() else completions.shape[1]
                  for row in completions]
        if len(set(firsts)) > spread:
            best, spread = tok, len(set(firsts))
    return best


@pytest.mark.parametrize("sync_every", [1, 3])
def test_dropping_finished_rows_changes_no_token(sync_every, monkeypatch):
    from grpo.fast.decode import SlotDecoder

    sizes = []
    original = SlotDecoder.compact
    monkeypatch.setattr(SlotDecoder, "compact", lambda self, keep: (sizes.append(len(keep)), original(self, keep)))
    model = tiny_model(initializer_range=0.5)  # large weights: greedy rows wander instead of repeating a token
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (7, 3, 12, 5, 9, 4, 6, 11)]
    free = fast_sample(model, prompts, group_size=2, max_new_tokens=24, eos_ids=[], pad_id=PAD, greedy=True)
    eos = _first_token_per_row_position(free.completion_ids)
    kept = fast_sample(model, prompts, group_size=2, max_new_tokens=24, eos_ids=[eos], pad_id=PAD, greedy=True,
                  sync_every=sync_every, compact=False)
    dropped = fast_sample(model, prompts, group_size=2, max_new_tokens=24, eos_ids=[eos], pad_id=PAD, greedy=True,
                     sync_every=sync_every, compact=True)
    lengths = kept.completion_lengths
    assert lengths.min() < lengths.max()  # rows really end at different steps
    assert sizes and sizes == sorted(sizes, reverse=True)  # the batch shrank, in power-of-two buckets
    assert all(n & (n - 1) == 0 for n in sizes)
    assert torch.equal(dropped.completion_ids, kept.completion_ids)
    assert torch.equal(dropped.completion_mask, kept.completion_mask)
    assert torch.allclose(dropped.logp, kept.logp, atol=1e-5)
    for row in range(free.completion_ids.shape[0]):  # and both are the free run cut after its first EOS
        n = int(kept.completion_mask[row].sum())
        assert kept.completion_ids[row, :n].tolist() == free.completion_ids[row, :n].tolist()


def test_logprobs_match_a_full_forward_after_rows_were_dropped():
    model = tiny_model()
    prompts = ragged_prompts()
    gen = torch.Generator().manual_seed(5)
    r = fast_sample(model, prompts, group_size=4, max_new_tokens=20, eos_ids=list(range(2, 40)), pad_id=PAD,
               temperature=0.8, generator=gen)  # many EOS ids: rows end early, at different steps
    assert r.completion_lengths.min() < r.completion_lengths.max()
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask.long()], 1)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    ref = torch.log_softmax(logits[:, P - 1:P + T - 1] / 0.8, -1).gather(-1, r.completion_ids[..., None])[..., 0]
    m = r.completion_mask.bool()
    assert torch.allclose(r.logp[m], ref[m], atol=1e-4)
    assert (r.completion_ids[~m] == PAD).all()


def test_stop_strings_checked_every_few_steps_end_rows_where_checking_every_step_does():
    model = tiny_model(vocab_size=26)
    prompts = [[2, 3, 4], [5, 6], [7, 8, 9, 10]]
    free = fast_sample(model, prompts, group_size=1, max_new_tokens=16, eos_ids=[25], pad_id=0, greedy=True)
    text = _CharTokenizer().decode(free.completion_ids[0].tolist())
    stop = StopStrings(_CharTokenizer(), [text[4:6]])
    every = fast_sample(model, prompts, group_size=1, max_new_tokens=16, eos_ids=[25], pad_id=0, greedy=True,
                   stop=stop, sync_every=1)
    later = fast_sample(model, prompts, group_size=1, max_new_tokens=16, eos_ids=[25], pad_id=0, greedy=True,
                   stop=stop, sync_every=5)
    T = every.completion_ids.shape[1]
    assert torch.equal(later.completion_mask[:, :T], every.completion_mask)
    assert torch.equal(later.completion_ids[:, :T], every.completion_ids)
    assert torch.equal(later.truncated, every.truncated) and not every.truncated[0]
    assert later.completion_mask[:, T:].sum() == 0 and (later.completion_ids[:, T:] == 0).all()


def test_static_cache_under_cpu_bf16_autocast_tracks_the_training_forward():
    from grpo.logprobs import completion_logprobs

    model = tiny_model()
    prompts = ragged_prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = fast_sample(model, prompts, group_size=2, max_new_tokens=12, eos_ids=[EOS], pad_id=PAD,
                   generator=torch.Generator().manual_seed(0))
        ref = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    m = r.completion_mask.bool()
    assert (r.logp[m] - ref[m]).abs().max() < 0.1  # bf16 tolerance: the decode step and the full forward differ


@pytest.mark.parametrize("method", ["draw", "draw_inverse_cdf", "draw_gumbel_max"])
def test_draw_follows_the_distribution_and_never_picks_a_zero_probability_token(method):
    import grpo.sampler as sampler

    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    logits = probs.log().expand(40000, 5)  # -inf where the probability is 0
    fn = getattr(sampler, method)
    tokens = fn(probs.expand(40000, 5) if method == "draw_inverse_cdf" else logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).float() / 40000
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs, atol=0.01)  # 4 sigma of a binomial at n = 40000 is ~0.01


def test_gumbel_max_matches_the_exact_softmax_of_shifted_logits_over_a_large_vocabulary():
    from grpo.sampler import draw_gumbel_max

    # a peaked row over 4,096 tokens, shifted by a large constant (softmax is shift-invariant, so must the draw be)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4096, generator=g) * 2
    logits[7] += 6.0
    probs = torch.softmax(logits.double(), -1)  # the exact distribution
    tokens = draw_gumbel_max((logits + 1000.0).expand(20000, -1), torch.Generator().manual_seed(2))
    freq = torch.bincount(tokens, minlength=4096).double() / 20000
    top = probs.argsort(descending=True)[:5]
    sigma = (probs[top] * (1 - probs[top]) / 20000).sqrt()
    assert ((freq[top] - probs[top]).abs() <= 4 * sigma + 1e-4).all(), (freq[top], probs[top])
    rest = torch.ones(4096, dtype=torch.bool)
    rest[top] = False
    assert abs(float(freq[rest].sum() - probs[rest].sum())) <= 4 * float((probs[rest].sum() / 20000).sqrt()) + 1e-4


# ---- the CPU savings of SlotDecoder: split cache (prompt keys once per prompt) and MKL-packed weights ---------
def _decode_steps(model, prompts, group_size, split, packed, steps=10, compact_at=None, keep=None, **options):
    """Logits of `steps` decode steps (fixed tokens, so every configuration sees the same inputs), optionally
    dropping rows (`keep`, in the given order) after step `compact_at`. The full slot cache where split and
    options say nothing else (the grid cache, the default where split is off, needs grid_cache=None/True)."""
    from grpo.fast.decode import SlotDecoder

    ids, mask = left_pad(prompts, PAD)
    options.setdefault("grid_cache", None if split else False)
    decoder = SlotDecoder(model, ids.shape[1], steps, cuda_graphs=False, split_cache=split, packed_weights=packed,
                          **options)
    with torch.no_grad():
        outs = [decoder.prefill(ids, mask, group_size, steps)]
        position = mask.sum(-1).repeat_interleave(group_size)  # (N,)
        g = torch.Generator().manual_seed(3)
        token = torch.randint(2, 128, (position.shape[0],), generator=g)
        for t in range(steps - 1):
            if t == compact_at:
                decoder.compact(keep)
                position, token = position[keep], token[keep]
            outs.append(decoder.step(token, position, t).clone())
            position = position + 1
            token = (token * 7 + t) % 126 + 2
    return outs, decoder


@pytest.mark.parametrize("config", [{}, TINY_LLAMA], ids=["qwen2-with-qkv-bias", "llama"])
def test_split_cache_and_packed_weights_give_the_full_slot_cache_logits(config):
    from grpo.fast.decode import packing_possible

    model = tiny_model(initializer_range=0.3, **config)
    prompts = ragged_prompts()  # left padding: the prompt mask matters
    reference, _ = _decode_steps(model, prompts, 3, split=False, packed=False)
    variants = [(True, False)] + ([(False, True), (True, True)] if packing_possible(model) else [])
    for split, packed in variants:
        ours, decoder = _decode_steps(model, prompts, 3, split=split, packed=packed)
        assert decoder.split == split and decoder.pack == packed
        for a, b in zip(ours, reference):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (split, packed, (a - b).abs().max())


@pytest.mark.parametrize("flash", [True, False], ids=["flash-kernel-with-lse", "explicit-softmax"])
def test_split_cache_after_dropping_every_row_of_a_prompt_and_shuffling_the_rest(flash, monkeypatch):
    import grpo.fast.decode

    if flash and grpo.fast.decode.flash_lse_kernel() is None:
        pytest.skip("this PyTorch has no CPU flash kernel returning log-sum-exps")
    if not flash:  # the path taken where the private kernel is missing
        monkeypatch.setattr(grpo.fast.decode, "flash_lse_kernel", lambda: None)
    model = tiny_model(initializer_range=0.3)
    prompts = ragged_prompts()  # 4 prompts x 3 rows = 12 rows; row r belongs to prompt r // 3
    keep = torch.tensor([11, 0, 4, 5, 2, 9, 10, 1])  # prompt 3 loses a row, prompt 1 keeps 2, prompt 2 is gone
    reference, _ = _decode_steps(model, prompts, 3, split=False, packed=False, compact_at=4, keep=keep)
    ours, decoder = _decode_steps(model, prompts, 3, split=True, packed=None, compact_at=4, keep=keep)
    assert decoder.prefix_keys[0].shape[0] == 3  # the prompt no row reads any more was dropped from the cache
    assert decoder.group_rows == 3 and decoder.grid_index is not None
    if decoder.pack:
        assert decoder._packed.rows == 8  # packed again for the smaller batch
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


# ---- the grid cache (CUDA's default layout: one cache per prompt, its rows' tokens step-major after it) ---------
@pytest.mark.parametrize("config", [{}, TINY_LLAMA], ids=["qwen2-with-qkv-bias", "llama"])
@pytest.mark.parametrize("stacked", [False, True], ids=["module-linears", "stacked-linears"])
def test_grid_cache_gives_the_full_slot_cache_logits_through_compactions(config, stacked):
    model = tiny_model(initializer_range=0.3, **config)
    prompts = ragged_prompts()  # 4 prompts x 3 rows, left-padded: the prompt part of the mask matters
    cases = [(None, None, 3, 4),  # no compaction: the grid is the rows in order
             # prompt 2 loses every row, 1 keeps two, 3 loses one; the rest shuffled: grid_index needed
             (4, torch.tensor([11, 0, 4, 5, 2, 9, 10, 1]), 3, 3),
             (2, torch.tensor([0, 3, 6, 9]), 1, 4)]  # one row per prompt left: Gmax 3 -> 1, the cache shrinks
    for compact_at, keep, rows_after, prompts_after in cases:
        reference, _ = _decode_steps(model, prompts, 3, split=False, packed=False, compact_at=compact_at, keep=keep)
        ours, decoder = _decode_steps(model, prompts, 3, split=False, packed=False, compact_at=compact_at,
                                      keep=keep, grid_cache=True, stacked_weights=stacked)
        assert decoder.grid and decoder.stack == stacked and len(decoder._stacked) == (4 if stacked else 0)
        assert decoder.group_rows == rows_after and decoder.keys[0].shape[0] == prompts_after
        r = model.config.num_attention_heads // model.config.num_key_value_heads
        assert decoder.mask.shape[:3] == (prompts_after, 1, rows_after * r)  # (B, 1, Gmax * r, S)
        for a, b in zip(ours, reference):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (compact_at, (a - b).abs().max())


def test_grid_cache_reads_each_prompt_once_and_masks_other_rows_tokens():
    """The layout itself: a (B, h, S, d) cache, S = prompt slots + T x G, and a mask that shows each query row
    its own completion slots only, once written."""
    model = tiny_model()
    prompts = ragged_prompts()
    _, decoder = _decode_steps(model, prompts, 3, split=False, packed=False, steps=5, grid_cache=None)
    assert decoder.grid  # the default wherever the split cache is off and prompts have several rows
    B, h, S, d = decoder.keys[0].shape
    assert (B, S) == (4, decoder.prefix_slots + 16) and decoder.prefix_slots % 16 == 0  # 5 x 3 -> 16 slots
    own = (decoder.mask[0, 0, :, decoder.prefix_slots:] == 0)  # (G * r, S - prompt slots)
    written = 4  # steps fed: 5 - 1
    for query in range(3 * 2):
        row = query // 2
        assert own[query].nonzero().flatten().tolist() == [t * 3 + row for t in range(written)]
    _, single = _decode_steps(model, prompts, 1, split=False, packed=False, steps=5, grid_cache=None)
    assert not single.grid  # one row per prompt: nothing to share, the full slot cache


def test_fused_ops_give_the_eager_logits_and_fall_back_when_compiling_fails(monkeypatch):
    """FusedOps (torch.compile'd rotary, residual add + RMSNorm, SiLU * up: a CUDA-graph default) asked for on the
    CPU, where Inductor compiles C++: the same logits through a compaction; and without a compiler, a warning and
    the eager ops."""
    from grpo.fast.decode import FusedOps, SlotDecoder

    model = tiny_model(initializer_range=0.3)
    prompts = ragged_prompts()
    keep = torch.tensor([11, 0, 4, 5, 2, 9, 10, 1])
    reference, plain = _decode_steps(model, prompts, 3, split=False, packed=False, compact_at=4, keep=keep)
    assert plain._fused is None  # off without CUDA graphs
    ours, decoder = _decode_steps(model, prompts, 3, split=False, packed=False, compact_at=4, keep=keep,
                                  grid_cache=True, fused_ops=True)
    if decoder._fused is None:
        pytest.skip("torch.compile cannot build here (no C++ compiler)")
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(FusedOps, "_made", {})
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="fused decode ops unavailable"):
        fallback = SlotDecoder(model, 8, 8, cuda_graphs=False, split_cache=False, packed_weights=False,
                               fused_ops=True)
    assert fallback._fused is None


def test_a_compiled_op_that_fails_turns_into_its_eager_function(monkeypatch):
    from grpo.fast.decode import _Compiled, _silu_mul

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # no compiling needed to test the fallback
    op = _Compiled(_silu_mul)
    gate_up = torch.randn(3, 1, 8)

    def broken(*args):
        raise RuntimeError("cannot build for this shape")

    op.compiled = broken
    with pytest.warns(UserWarning, match="running it unfused"):
        out = op(gate_up, 4)
    assert op.compiled is None and torch.equal(out, _silu_mul(gate_up, 4))
    assert torch.equal(op(gate_up, 4), out)  # later calls: the eager function, no warning


def test_cpu_savings_are_on_by_default_for_float32_and_refused_where_they_cannot_apply():
    from grpo.fast.decode import SlotDecoder, make_decoder, packing_possible

    model = tiny_model()
    decoder = make_decoder(model, "static", 8, 8, None)
    assert decoder.split and decoder.pack == packing_possible(model)
    assert decoder._norm_args  # the float32 RMSNorm in fewer ops was checked against the module and taken
    plain = make_decoder(model, "static", 8, 8, None, split_cache=False, packed_weights=False)
    assert not plain.split and not plain.pack and plain._packed is None
    half = tiny_model().to(torch.bfloat16)
    assert not packing_possible(half)
    auto = make_decoder(half, "static", 8, 8, None)
    assert not auto.split and not auto.pack and not auto._norm_args  # bf16: the full slot cache and SDPA
    with pytest.raises(ValueError, match="split_cache"):
        SlotDecoder(half, 8, 8, cuda_graphs=False, split_cache=True)
    with pytest.raises(ValueError, match="packed_weights"):
        SlotDecoder(half, 8, 8, cuda_graphs=False, packed_weights=True)
    with pytest.raises(ValueError, match="grid_cache and split_cache"):
        SlotDecoder(model, 8, 8, cuda_graphs=False, split_cache=True, grid_cache=True)
    assert not auto.stack and not decoder.stack  # stacked weights: a CUDA default (a second copy of q/k/v, gate/up)
    assert not SlotDecoder(model, 8, 8, cuda_graphs=False, packed_weights=True, stacked_weights=True).stack \
        or not packing_possible(model)  # packed products already stack their groups
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="stacked_weights"):
        SlotDecoder(model, 8, 8, cuda_graphs=False, stacked_weights=True)


def test_greedy_tokens_are_the_same_with_and_without_the_cpu_savings():
    model = tiny_model(initializer_range=0.5)
    prompts = ragged_prompts()
    runs = [fast_sample(model, prompts, group_size=3, max_new_tokens=20, eos_ids=[], pad_id=PAD, greedy=True,
                   decode_options=opts)
            for opts in ({"split_cache": False, "packed_weights": False}, {})]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert torch.allclose(runs[0].logp, runs[1].logp, atol=1e-5)


# ---- the shared prefix: the prompts' common leading tokens prefilled once (grpo/fast/prefill.py) -------------
def prompts_with_a_common_prefix(seed=0):
    """Ragged prompts that start alike, as a template's system message and worked example make them: one is the
    shared prefix plus a single token, another continues a prefix of the others' own tokens."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(2, 128, (9,), generator=g).tolist()
    own = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (1, 6, 3, 11)]
    return [common + tail for tail in own] + [common[:5] + own[1]]


def test_shared_prefix_length_leaves_every_prompt_a_token_of_its_own():
    from grpo.fast.prefill import shared_prefix_length

    prompts = prompts_with_a_common_prefix()
    assert shared_prefix_length(*left_pad(prompts[:4], PAD)) == 9
    assert shared_prefix_length(*left_pad(prompts, PAD)) == 5  # the last one leaves the common part after 5
    assert shared_prefix_length(*left_pad([prompts[0], prompts[0]], PAD)) == 9  # identical: all but the last
    assert shared_prefix_length(*left_pad([[5, 6], [7, 6]], PAD)) == 0


@pytest.mark.parametrize("config", [{}, TINY_LLAMA], ids=["qwen2-with-qkv-bias", "llama"])
def test_a_shared_prefix_gives_the_logits_of_prefilling_every_prompt_whole(config):
    model = tiny_model(initializer_range=0.3, **config)
    prompts = prompts_with_a_common_prefix()
    reference, _ = _decode_steps(model, prompts, 2, split=False, packed=False, shared_prefix=False)
    for split in (False, True):
        ours, decoder = _decode_steps(model, prompts, 2, split=split, packed=False, shared_prefix=True)
        for a, b in zip(ours, reference):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (split, (a - b).abs().max())


def test_greedy_and_sampled_tokens_are_the_same_with_and_without_the_shared_prefix():
    model = tiny_model(initializer_range=0.5)
    prompts = prompts_with_a_common_prefix()
    for greedy in (True, False):
        runs = [fast_sample(model, prompts, group_size=2, max_new_tokens=16, eos_ids=[], pad_id=PAD, greedy=greedy,
                            generator=torch.Generator().manual_seed(1), decode_options={"shared_prefix": shared})
                for shared in (False, True)]
        assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
        assert torch.allclose(runs[0].logp, runs[1].logp, atol=1e-5)
        assert torch.equal(runs[0].prompt_mask, runs[1].prompt_mask)  # the rollout's prompts stay left-padded
