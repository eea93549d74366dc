"""scripts/scale_check.py, the GPU scale check, runs end to end on the CPU at a tiny shape: our loop trained
a few steps on the toy task, the peak memory measured, the planner's figures beside it."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_scale_check_runs_our_loop_and_prints_measured_and_planned_memory(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("scale_check", REPO / "scripts" / "scale_check.py")
    scale_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale_check)
    rc = scale_check.main(["--shape", "tiny", "--device", "cpu", "--steps", "2", "--prompts", "2", "--group", "2",
                           "--prompt-tokens", "12", "--new-tokens", "5", "--micro-batch", "2", "--lora-rank", "4",
                           "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert [s["step"] for s in result["steps"]] == [1, 2]
    assert all(s["len/completion_mean"] == 5 for s in result["steps"])  # a random model runs to the limit
    assert result["peaks_by_rank"][0]["peak_rss_gib"] > 0.1
    assert result["planned"]["fits"] and result["planned"]["peak_gib"] > 0
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "adapters.safetensors").exists()
