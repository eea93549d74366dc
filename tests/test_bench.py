"""experiments.bench on a tiny random model: every figure is written, the HF static mode can be time-limited."""
import argparse
import json

import pytest
import torch

from experiments import bench


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    assert bench.main(["--preset", "cpu", "--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_quick_cpu_bench_writes_every_figure(quick_report):
    r = quick_report
    assert r["preset"] == "cpu" and r["quick"] and r["machine"]["torch"] and r["machine"]["transformers"]
    for mode in ("ours", "hf_dynamic", "hf_static"):
        result = r["sampler"][mode]
        assert result["status"] == "ok" and result["tokens"] == 2 * 2 * 8 and result["tokens_per_s"] > 0
    assert "first_call_s" in r["sampler"]["hf_static"]
    assert r["logprob_check"]["within_tolerance"] and r["logprob_check"]["max_abs_diff"] < 1e-3
    for variant in ("measures_on", "measures_off"):
        update = r["train"][variant]
        assert update["status"] == "ok" and update["tokens"] == 4 * 24 and update["tokens_per_s"] > 0
        assert update["rss_peak_gib"] >= update["rss_start_gib"] > 0
    assert r["train"]["measures_on"]["gradient_checkpointing"] and not r["train"]["measures_off"]["gradient_checkpointing"]
    summary = r["summary"]
    assert summary["baseline"] in ("hf_dynamic", "hf_static") and summary["ratio"] > 0
    assert any(line.startswith("ratio:") for line in summary["lines"])
    # CPU extras: our sampler without its CPU savings, and ours vs the faster HF mode timed back to back
    assert r["sampler"]["ours_full_cache_unpacked"]["status"] == "ok"
    paired = r["paired"]
    assert paired["baseline"] == summary["baseline"] and paired["rounds"] == 3
    assert len(paired["ratios"]) == 3 and all(x > 0 for x in paired["ratios"])
    assert summary["paired_ratio"] == paired["median_ratio"]
    assert any(line.startswith("paired ratio") for line in summary["lines"])


def test_hf_modes_over_their_time_limit_are_reported_as_skipped(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--preset", "cpu", "--quick", "--skip-train", "--hf-timeout", "0.001", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["sampler"]["hf_static"]["status"] == "skipped" and "time limit" in r["sampler"]["hf_static"]["reason"]
    assert r["sampler"]["hf_dynamic"]["status"] == "skipped"
    assert r["sampler"]["ours"]["status"] == "ok" and "ratio" not in r["summary"]
    assert "train" not in r


def test_gpu_presets_say_they_need_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert bench.main(["--preset", "gpu-7b", "--out", str(tmp_path / "x.json")]) == 2


def _settings(*argv):
    """The settings `bench.main` would run with, from its own command line."""
    parser_args = argparse.Namespace(seed=0, quick=False, model=None, **{k: None for k in (
        "prompts", "group_size", "prompt_tokens", "new_tokens", "reps", "device", "dtype")})
    for flag, value in zip(argv[::2], argv[1::2]):
        setattr(parser_args, flag.lstrip("-").replace("-", "_"), value)
    return bench.resolve_settings(parser_args)


@pytest.mark.parametrize("preset, params, sample_rows, update_tokens, micro_batches", [
    ("cpu", None, 8, (8, 768), 2),  # the converted SmolLM2-135M-Instruct, 8 rows; the update 8 x 768 tokens
    ("gpu-small", 134_515_008, 256, (32, 1024), 4),  # SmolLM2-135M's shape, 256 rows; the update 32 x 1024
    ("gpu-7b", 7_615_616_512, 64, (8, 1024), 2),  # Qwen2.5-7B-Instruct's shape, 64 rows; the update 8 x 1024
])
def test_a_preset_builds_the_named_model_and_batches(preset, params, sample_rows, update_tokens, micro_batches):
    """What a preset produces: the model it builds (a random one on the meta device: its shape, no memory), the
    sampler's prompts (rows = prompts x group size, 512-token prompts, 256 new tokens), the update's rollout and
    how its token budget splits that rollout into micro-batches."""
    from grpo.batching import plan_micro_batches

    s = _settings("--preset", preset)
    if params is None:
        assert s["model"] == "default" and s["dtype"] == "float32"  # loaded, not built: needs `make model`
        vocab = 49152
    else:
        model = bench.build_model(s, torch.device("meta"))
        assert sum(p.numel() for p in model.parameters()) == params  # the published parameter count
        assert next(model.parameters()).dtype == torch.bfloat16
        vocab = model.config.vocab_size
    prompts = bench.random_prompts(s["prompts"], s["prompt_tokens"], vocab, s["seed"])
    assert len(prompts) * s["group_size"] == sample_rows and {len(p) for p in prompts} == {512}
    assert s["new_tokens"] == 256
    r = bench.synthetic_rollout(s, vocab, torch.device("cpu"), s["seed"])
    rows = r["prompt_ids"].shape[0]
    assert (rows, r["prompt_ids"].shape[1] + r["completion_ids"].shape[1]) == update_tokens
    assert len(plan_micro_batches(r["prompt_mask"], r["completion_mask"], rows, s["micro_batch_tokens"])) \
        == micro_batches


def test_quick_and_command_line_flags_override_a_preset():
    quick = _settings("--preset", "gpu-7b", "--quick", True)
    assert quick["model"] == "random" and quick["shape"] == bench.TINY and quick["device"] == "cpu"
    s = _settings("--preset", "cpu", "--prompts", 3, "--new-tokens", 16)
    assert (s["prompts"], s["new_tokens"], s["group_size"]) == (3, 16, 8)
