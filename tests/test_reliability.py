"""What a run does when things go wrong: a reused folder, a failed attempt, NaN, a kill during a checkpoint
write, a crafted checkpoint, bad settings, a wrong path. Each case was reproduced against the previous code
(see the issue's list) and is asserted here on a tiny random model and the toy task, in seconds."""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments.toy import WordTask
from grpo.config import ConfigError, GRPOConfig, ModelConfig, RunConfig, SamplingConfig
from grpo.runlog import read_jsonl
from grpo.train import train
from tests.conftest import TINY_QWEN2, word_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"))


def run(tokenizer_dir, out, task=None, grpo=None, **run_kw):
    model = ModelConfig(tokenizer=str(tokenizer_dir), random_init=dict(TINY_QWEN2), device="cpu")
    cfg = replace(GRPOConfig(steps=2, batch_prompts=2, group_size=2, micro_batch_size=4, lr=1e-3), **(grpo or {}))
    run_cfg = replace(RunConfig(output_dir=str(out), eval_examples=0, eval_at_start=False, plot=False), **run_kw)
    return train(model, SamplingConfig(max_new_tokens=4), cfg, run_cfg, task or WordTask())


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/mean" in r]


def test_a_finished_run_is_never_trained_over(tokenizer_dir, tmp_path):
    out = run(tokenizer_dir, tmp_path / "r")
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "run.json", "metrics.jsonl")}
    with pytest.raises(FileExistsError, match="run.resume=latest.*run.overwrite=true"):
        run(tokenizer_dir, tmp_path / "r")
    assert {name: (out / name).read_bytes() for name in before} == before
    run(tokenizer_dir, tmp_path / "r", overwrite=True, seed=1)  # explicitly: start over
    assert steps_logged(out) == [1, 2]  # not [1, 2, 1, 2]
    assert "seed: 1" in (out / "config.yaml").read_text()


class BrokenTask(WordTask):
    def items(self, split):
        raise FileNotFoundError("no such data folder: /nowhere")


def test_a_failed_attempt_leaves_the_run_folder_untouched(tokenizer_dir, tmp_path):
    out = run(tokenizer_dir, tmp_path / "r")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(FileNotFoundError, match="/nowhere"):
        run(tokenizer_dir, tmp_path / "r", task=BrokenTask(), resume="latest")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    fresh = tmp_path / "fresh"
    with pytest.raises(FileNotFoundError):
        run(tokenizer_dir, fresh, task=BrokenTask())
    assert not fresh.exists()  # nothing written before the inputs were read


class NaNTask(WordTask):
    def reward(self, item, completion):
        return math.nan, {"hits": math.nan}


def test_non_finite_updates_are_skipped_then_stop_the_run_without_a_nan_checkpoint(tokenizer_dir, tmp_path):
    with pytest.raises(FloatingPointError, match=r"2 steps in a row.*grpo.lr=0.001"):
        run(tokenizer_dir, tmp_path / "r", task=NaNTask(), grpo={"steps": 4, "max_nonfinite_steps": 2}, save_every=1)
    rows = [r for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "reward/mean" in r]
    assert [r["update/skipped_nonfinite"] for r in rows] == [1]  # step 1 logged; step 2 stopped the run
    # the step-1 checkpoint holds the untouched (finite) initial weights
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "r" / "checkpoints" / "step_1" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_weights_with_nan_are_never_checkpointed(tokenizer_dir, tmp_path):
    from grpo.checkpoint import save_checkpoint
    from grpo.policy import load_policy

    policy = load_policy(ModelConfig(tokenizer=str(tokenizer_dir), random_init=dict(TINY_QWEN2), device="cpu"))
    with torch.no_grad():
        next(policy.model.parameters())[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        save_checkpoint(tmp_path / "step_1", policy)
    assert not (tmp_path / "step_1").exists() and not (tmp_path / "step_1.partial").exists()


def test_a_kill_during_a_checkpoint_write_or_a_metrics_append_does_not_block_resume(tokenizer_dir, tmp_path):
    out = run(tokenizer_dir, tmp_path / "r", save_every=1, grpo={"steps": 2})
    (out / "checkpoints" / "step_5.partial").mkdir()  # a write that was killed
    (out / "checkpoints" / "step_5.partial" / "model.safetensors").write_bytes(b"half")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')  # a torn last line
    run(tokenizer_dir, out, save_every=1, grpo={"steps": 3}, resume="latest")
    assert steps_logged(out) == [1, 2, 3]
    assert not list((out / "checkpoints").glob("*.partial"))  # leftovers removed


def test_killed_before_the_first_checkpoint_resume_starts_over_without_duplicate_steps(tokenizer_dir, tmp_path):
    out = run(tokenizer_dir, tmp_path / "r")
    import shutil

    shutil.rmtree(out / "checkpoints")  # as if killed before any save
    run(tokenizer_dir, out, resume="latest")
    assert steps_logged(out) == [1, 2]
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert len(sessions) == 2 and all(s["wall_s"] > 0 for s in sessions)  # both sessions counted


def test_a_crafted_trainer_state_cannot_run_code(tokenizer_dir, tmp_path):
    out = run(tokenizer_dir, tmp_path / "r")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    state = out / "checkpoints" / "step_2" / "trainer_state.pt"
    torch.save({"step": 2, "evil": Evil()}, state)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        run(tokenizer_dir, out, grpo={"steps": 3}, resume="latest")
    assert not marker.exists()


@pytest.mark.parametrize("override, message", [
    ("grpo.group_size=0", "grpo.group_size must be >= 2"),
    ("grpo.micro_batch_size=0", "grpo.micro_batch_size must be >= 1"),
    ("sampling.max_new_tokens=0", "sampling.max_new_tokens must be >= 1"),
    ("grpo.clip_eps_low=-0.1", "grpo.clip_eps_low must be in"),
    ("grpo.mu=0", "grpo.mu must be >= 1"),
    ("grpo.steps=-2", "grpo.steps must be >= 1"),
    ("sampling.temperature=0", "sampling.temperature must be > 0"),
    ("grpo.lr=-1e-5", "grpo.lr must be >= 0"),
    ("run.resume=/no/such/checkpoint", "run.resume must be `latest` or an existing checkpoint folder"),
    ("model.lora.rank=-1", "model.lora.rank must be >= 0"),
])
def test_settings_are_range_checked_when_the_config_is_read(override, message):
    from experiments.config import load_experiment

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_experiment("experiments/configs/smoke.yaml", [override])


def test_the_train_command_reports_a_bad_setting_in_one_line(capsys):
    from experiments.train import main

    assert main(["--config", "experiments/configs/smoke.yaml", "grpo.group_size=0", "grpo.steps=-2"]) == 2
    err = capsys.readouterr().err
    assert "grpo.group_size must be >= 2" in err and "grpo.steps must be >= 1" in err and "Traceback" not in err


def test_wrong_model_paths_say_what_is_wrong(tmp_path):
    from grpo.models import resolve_model_path

    with pytest.raises(FileNotFoundError, match="no model folder"):
        resolve_model_path(str(tmp_path / "runs" / "x" / "checkpoints" / "step_9"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("run: {}\n")
    with pytest.raises(FileNotFoundError, match="a run folder: its weights are in checkpoints/step_N"):
        resolve_model_path(str(tmp_path / "run"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="a data folder"):
        resolve_model_path(str(tmp_path / "data"))
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"  # a hub id passes


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_resume_completes_the_run(tokenizer_dir, tmp_path):
    # SIGINT in the middle of step 2 (sent from inside the reward function): the loop finishes that step,
    # checkpoints it and returns without raising; run.resume=latest then completes the run.
    import os
    import signal

    from grpo.runlog import run_finished

    class InterruptedTask(WordTask):
        calls = 0

        def reward(self, item, completion):
            InterruptedTask.calls += 1
            if InterruptedTask.calls == 5:  # the first completion of step 2 (2 prompts x 2 completions a step)
                os.kill(os.getpid(), signal.SIGINT)
            return super().reward(item, completion)

    handler = signal.getsignal(signal.SIGINT)
    out = run(tokenizer_dir, tmp_path / "r", task=InterruptedTask(), grpo={"steps": 4})
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's handler is gone again
    assert steps_logged(out) == [1, 2] and (out / "checkpoints" / "step_2").is_dir() and not run_finished(out)
    run(tokenizer_dir, tmp_path / "r", grpo={"steps": 4}, resume="latest")
    assert steps_logged(out) == [1, 2, 3, 4] and run_finished(out)
