"""CUDA paths: skipped cleanly on machines without a GPU (CI), run on the lent GPU machine."""
import pytest
import torch

from conftest import tiny_model
from grpo.fast import sample
from grpo.sampler import left_pad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_greedy_matches_hf_generate_on_cuda():
    model = tiny_model().cuda()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (7, 3, 12, 5)]
    ours = sample(model, prompts, group_size=1, max_new_tokens=20, eos_ids=[1], pad_id=0, greedy=True, sync_every=8)
    ids, mask = left_pad(prompts, 0, "cuda")
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                        eos_token_id=1, pad_token_id=0)[:, ids.shape[1]:]
    for row in range(4):
        n = int(ours.completion_mask[row].sum())
        assert ours.completion_ids[row, :n].tolist() == hf[row, :n].tolist()


def test_sampler_logprobs_match_training_forward_under_bf16_autocast():
    from grpo.logprobs import completion_logprobs

    model = tiny_model().cuda()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (9, 4)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        r = sample(model, prompts, group_size=4, max_new_tokens=16, eos_ids=[1], pad_id=0,
                   generator=torch.Generator(device="cuda").manual_seed(0))
        logp = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    m = r.completion_mask.bool()
    diff = (logp[m] - r.logp[m]).abs().max().item()
    assert diff < 0.1, diff  # bf16 tolerance (decode step vs full forward use different kernels)


def test_smoke_training_run_on_cuda(tmp_path, data_dir, default_tokenizer):
    from experiments.config import load_experiment
    from experiments.task import RecTask
    from grpo.runlog import read_jsonl
    from grpo.train import train
    from recdata.prepare import main as prepare

    data = tmp_path / "music"
    assert prepare(["--dataset", "amazon-music", "--raw-dir", str(data_dir / "amazon-music-2014-sample"),
                    "--out", str(data), "--max-train", "16", "--max-val", "4", "--max-test", "4", "--quiet"]) == 0
    cfg = load_experiment("experiments/configs/smoke.yaml", [f"task.data_dir={data}", "model.device=cuda",
                                                              f"run.output_dir={tmp_path / 'run'}", "grpo.beta=0.1"])
    run_dir = train(cfg.model, cfg.sampling, cfg.grpo, cfg.run, RecTask(cfg.task, default_tokenizer), full_config=cfg)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == 3 and all(r["grad/norm"] == r["grad/norm"] for r in rows)


# ---- the CUDA-graph decode path (grpo/fast/decode.py) against the eager one and against HF ----------------------
def _ragged(n_prompts=4, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (7, 3, 12, 5, 9, 4, 6, 11)[:n_prompts]]


@pytest.fixture
def captures(monkeypatch):
    """Records the batch size of every successful capture of the decode step."""
    from grpo.fast.decode import SlotDecoder

    sizes = []
    original = SlotDecoder._capture

    def capture(self):
        ok = original(self)
        if ok:
            sizes.append(self._inputs[0].shape[0])
        return ok

    monkeypatch.setattr(SlotDecoder, "_capture", capture)
    return sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_gives_the_eager_tokens_and_logprobs(dtype, captures):
    model = tiny_model(initializer_range=0.5).to("cuda", dtype)
    prompts = _ragged(8)
    # the eager run with the same (compiled) elementwise ops as the graph: the replay itself must change nothing
    runs = {graphs: sample(model, prompts, group_size=3, max_new_tokens=24, eos_ids=[], pad_id=0, greedy=True,
                           sync_every=4, cuda_graphs=graphs, decode_options={"fused_ops": True})
            for graphs in (False, True)}
    assert captures == [24]  # one capture (8 prompts x 3), replayed for every step
    assert torch.equal(runs[True].completion_ids, runs[False].completion_ids)
    assert torch.allclose(runs[True].logp, runs[False].logp, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_graph_decode_matches_hf_generate(captures):
    model = tiny_model(initializer_range=0.5).cuda()
    prompts = _ragged(4)
    ours = sample(model, prompts, group_size=1, max_new_tokens=20, eos_ids=[], pad_id=0, greedy=True, sync_every=8)
    assert captures, "the CUDA graph path was not taken"
    ids, mask = left_pad(prompts, 0, "cuda")
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                        eos_token_id=None, min_new_tokens=20)[:, ids.shape[1]:]
    assert torch.equal(ours.completion_ids, hf)


def test_graph_decode_drops_finished_rows_into_smaller_captured_batches(captures):
    model = tiny_model(initializer_range=0.5).cuda()  # as tests/test_sampler.py's CPU twin of this test
    prompts = _ragged(8, seed=1)
    free = sample(model, prompts, group_size=2, max_new_tokens=24, eos_ids=[], pad_id=0, greedy=True)
    counts = {}
    for tok in free.completion_ids.unique().tolist():  # the token whose first occurrence is most spread out
        firsts = {int((row == tok).nonzero()[0]) if (row == tok).any() else 99 for row in free.completion_ids}
        counts[tok] = len(firsts)
    eos = max(counts, key=counts.get)
    captures.clear()
    kept = sample(model, prompts, group_size=2, max_new_tokens=24, eos_ids=[eos], pad_id=0, greedy=True,
                  sync_every=2, compact=False)
    dropped = sample(model, prompts, group_size=2, max_new_tokens=24, eos_ids=[eos], pad_id=0, greedy=True,
                     sync_every=2, compact=True)
    assert len(captures) > 2 and captures[0] == 16 and captures[-1] < 16  # compact=False: one; True: more
    assert torch.equal(dropped.completion_ids, kept.completion_ids)
    assert torch.equal(dropped.completion_mask, kept.completion_mask)
    assert torch.allclose(dropped.logp, kept.logp, atol=1e-5)


def test_graph_decode_logprobs_match_the_training_forward_in_bf16(captures):
    from grpo.logprobs import completion_logprobs

    model = tiny_model().to("cuda", torch.bfloat16)
    r = sample(model, _ragged(4), group_size=4, max_new_tokens=16, eos_ids=[1], pad_id=0, sync_every=8,
               generator=torch.Generator(device="cuda").manual_seed(0))
    assert captures
    logp = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    m = r.completion_mask.bool()
    assert (logp[m] - r.logp[m]).abs().max().item() < 0.1


def test_no_graphs_under_autocast_and_a_clean_fallback_when_capture_fails(monkeypatch):
    import grpo.fast.decode as decode

    model = tiny_model().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert not decode.make_decoder(model, "static", 8, 8, None).uses_graphs
    # a capture that fails: the call finishes eagerly with the same tokens
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: (_ for _ in ()).throw(RuntimeError("no graphs")))
    prompts = _ragged(4)
    with pytest.warns(UserWarning, match="CUDA graph capture"):
        broken = sample(model, prompts, group_size=2, max_new_tokens=12, eos_ids=[], pad_id=0, greedy=True)
    eager = sample(model, prompts, group_size=2, max_new_tokens=12, eos_ids=[], pad_id=0, greedy=True,
                   cuda_graphs=False)
    assert torch.equal(broken.completion_ids, eager.completion_ids)


def test_bench_runs_on_cuda(tmp_path):
    import json

    from experiments.bench import main

    out = tmp_path / "bench.json"
    assert main(["--preset", "gpu-small", "--quick", "--device", "cuda", "--hf-static", "off",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sampler"]["ours"]["status"] == "ok" and report["sampler"]["ours_no_graphs"]["status"] == "ok"
    assert report["logprob_check"]["within_tolerance"]
    assert report["train"]["measures_on"]["status"] == "ok" and "peak_gib" in report["train"]["measures_on"]
    assert report["summary"]["ratio"] > 0


def test_gumbel_max_draws_on_cuda_follow_the_exact_softmax():
    from grpo.sampler import draw

    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0], device="cuda")
    tokens = draw(probs.log().expand(40000, 5), torch.Generator(device="cuda").manual_seed(0))  # the Gumbel path
    freq = torch.bincount(tokens, minlength=5).float() / 40000
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs, atol=0.01)  # 4 sigma of a binomial at n = 40000 is ~0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_ops_match_the_model_modules_on_cuda(dtype):
    from grpo.fast.decode import _rms_norm, make_decoder

    model = tiny_model(initializer_range=0.5).to("cuda", dtype)
    decoder = make_decoder(model, "static", 8, 8, None)
    assert decoder._fused_norm  # the one-kernel RMSNorm was checked against the module and taken
    x = torch.randn(16, 1, model.config.hidden_size, device="cuda").to(dtype) * 4
    norm = model.get_decoder().layers[0].input_layernorm
    assert torch.equal(_rms_norm(norm, x), norm(x)) or torch.allclose(_rms_norm(norm, x).float(), norm(x).float(),
                                                                      rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grid_cache_graphs_and_stacked_weights_give_the_full_slot_cache_logits(dtype, captures):
    """CUDA's defaults (stacked q/k/v and gate/up, fused elementwise ops, graph replay) with the grid cache against
    the full slot cache run eagerly with the modules' linears, step by step, through a compaction that drops a
    prompt and shuffles rows."""
    from grpo.fast.decode import SlotDecoder, make_decoder

    model = tiny_model(initializer_range=0.3).to("cuda", dtype)
    default = make_decoder(model, "static", 8, 8, None)
    assert default.uses_graphs and default.stack and not default.split and not default.pack
    assert default._fused is not None  # the compiled elementwise chains, checked against the eager ones
    # the grid cache by default only where its attention has blocks for half the SMs: 4 prompts x 2 heads do not
    assert not default._grid_fills_gpu(4, 3) and default._grid_fills_gpu(1000, 3)
    ids, mask = left_pad(_ragged(4), 0, "cuda")
    keep = torch.tensor([11, 0, 4, 5, 2, 9, 10, 1], device="cuda")  # prompt 2 loses every row
    logits = {}
    for name, options in (("reference", dict(cuda_graphs=False, grid_cache=False, stacked_weights=False)),
                          ("ours", dict(cuda_graphs=True, grid_cache=True))):
        with torch.no_grad():  # as in the sampler
            decoder = SlotDecoder(model, ids.shape[1], 10, **options)
            outs = [decoder.prefill(ids, mask, 3, 10).float()]
            position = mask.sum(-1).repeat_interleave(3)
            token = torch.randint(2, 128, (12,), generator=torch.Generator().manual_seed(3)).cuda()
            for t in range(9):
                if t == 4:
                    decoder.compact(keep)
                    position, token = position[keep], token[keep]
                outs.append(decoder.step(token, position, t).float().clone())
                position, token = position + 1, (token * 7 + t) % 126 + 2
        logits[name] = outs
        if name == "ours":
            assert decoder.grid and decoder.uses_graphs and decoder.keys[0].shape[0] == 3
    assert captures == [12, 8]  # one capture per batch size
    # bf16: a few units in the last place of logits ~4 (0.03 each), through 2 layers of weights of std 0.3
    tol = 1e-4 if dtype == torch.float32 else 0.2
    for a, b in zip(logits["ours"], logits["reference"]):
        assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


def test_training_samples_from_a_bf16_copy_with_graphs(captures):
    """fp32 master weights under bf16 autocast (the trainer's CUDA setting): `auto` samples from a bf16 copy of
    the weights, so the decode step is captured as a graph, with log-probs as close to the autocast training
    forward as decoding under autocast itself."""
    from conftest import CharTokenizer, decode_weights_gaps
    from grpo.policy import Policy

    policy = Policy(model=tiny_model().cuda(), tokenizer=CharTokenizer(), eos_ids=[1], pad_id=0,
                    autocast_dtype=torch.bfloat16)

    def graphs_as_expected(setting):  # autocast decodes eagerly; the copy replays graphs
        assert bool(captures) == (setting == "auto"), setting
        captures.clear()

    diffs = decode_weights_gaps(policy, ("master", "auto"), device="cuda", each=graphs_as_expected)
    assert policy.decode_copy is not None
    assert diffs["auto"] < max(0.05, 1.5 * diffs["master"]), diffs


def test_split_cache_asked_for_on_cuda_runs_eagerly_and_matches_the_graph_path():
    """The split cache is a CPU default; asked for on a CUDA float32 model it turns graphs off, takes the explicit
    softmax (the flash-with-LSE kernel it merges with on the CPU is a CPU kernel) and gives the same tokens."""
    from grpo.fast.decode import make_decoder

    model = tiny_model(initializer_range=0.5).cuda()
    decoder = make_decoder(model, "static", 8, 8, None, split_cache=True)
    assert decoder.split and not decoder.uses_graphs and not decoder.pack
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (7, 3, 12)]
    runs = [sample(model, prompts, group_size=3, max_new_tokens=16, eos_ids=[], pad_id=0, greedy=True,
                   sync_every=4, decode_options=opts) for opts in ({}, {"split_cache": True})]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert torch.allclose(runs[0].logp, runs[1].logp, atol=1e-4)
