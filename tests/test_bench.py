"""experiments.bench on a tiny random model: every figure is written, the HF static mode can be time-limited."""
import json

import pytest

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


def test_presets_match_the_issue():
    cpu, small, big = bench.PRESETS["cpu"], bench.PRESETS["gpu-small"], bench.PRESETS["gpu-7b"]
    assert cpu["model"] == "default" and cpu["prompts"] * cpu["group_size"] == 8 and cpu["group_size"] == 8
    assert (cpu["prompt_tokens"], cpu["new_tokens"]) == (512, 256)
    assert small["shape"]["hidden_size"] == 576 and small["prompts"] * small["group_size"] == 256
    assert small["train_prompts"] * small["train_group"] == 32
    assert small["train_prompt_tokens"] + small["train_completion_tokens"] == 1024
    assert big["shape"]["hidden_size"] == 3584 and big["dtype"] == "bfloat16"
    assert big["prompts"] * big["group_size"] == 64 and (big["prompt_tokens"], big["new_tokens"]) == (512, 256)
    assert big["train_prompts"] * big["train_group"] == 8
    assert big["train_prompt_tokens"] + big["train_completion_tokens"] == 1024
