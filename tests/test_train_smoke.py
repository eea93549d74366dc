"""A 3-step GRPO run on a tiny random model: parameters change, every run file is written and readable,
the checkpoint reloads with transformers, and resuming continues from it."""
import json

import pytest
import torch
import yaml

from experiments.config import load_experiment
from experiments.task import RecTask
from grpo.runlog import read_jsonl
from grpo.policy import load_policy
from grpo.train import train

REPO_CONFIGS = "experiments/configs"


class VaryingRewardTask(RecTask):
    """The real task, except that a random model's gibberish must still earn *different* rewards, or every
    group is tied and the gradient is exactly zero: reward the share of vowels in the completion."""

    def reward(self, item, completion):
        total, parts = super().reward(item, completion)
        vowels = sum(c in "aeiou" for c in completion) / max(len(completion), 1)
        return total + vowels, {**parts, "vowels": vowels}


@pytest.fixture(scope="module")
def music_data(tmp_path_factory, data_dir):
    from recdata.prepare import main

    out = tmp_path_factory.mktemp("music")
    rc = main(["--dataset", "amazon-music", "--raw-dir", str(data_dir / "amazon-music-2014-sample"),
               "--out", str(out), "--max-train", "40", "--max-val", "8", "--max-test", "8", "--quiet"])
    assert rc == 0
    return out


def _config(tmp_path, music_data, *extra):
    return load_experiment(f"{REPO_CONFIGS}/smoke.yaml", [f"task.data_dir={music_data}",
                                                          f"run.output_dir={tmp_path / 'run'}", *extra])


def test_three_step_run_writes_everything_and_changes_parameters(tmp_path, music_data, default_tokenizer):
    cfg = _config(tmp_path, music_data, "grpo.beta=0.05", "grpo.mu=2", "run.save_every=2")
    before = load_policy(cfg.model, seed=cfg.run.seed).model.state_dict()
    run_dir = train(cfg.model, cfg.sampling, cfg.grpo, cfg.run, VaryingRewardTask(cfg.task, default_tokenizer),
                    full_config=cfg)

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["grpo"]["beta"] == 0.05 and saved["task"]["data_dir"] == str(music_data)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ["reward/mean", "reward/std", "reward/format_ok", "adv/frac_zero_std", "len/completion_mean",
                "len/truncated_frac", "loss/policy", "kl", "clip/frac", "entropy", "grad/norm", "lr",
                "time/generate_s", "time/update_s", "tokens_per_s"]:
        assert key in steps[-1], key
    evals = [r for r in rows if "eval/mae" in r]
    assert [r["step"] for r in evals] == [0, 3]
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert len(samples) == 6 and {"prompt", "completion", "reward", "advantage", "label"} <= set(samples[0])
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 3
    assert (run_dir / "curves.png").stat().st_size > 1000

    from transformers import AutoModelForCausalLM

    final = run_dir / "checkpoints" / "step_3"
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    assert (run_dir / "checkpoints" / "step_2" / "trainer_state.pt").exists()
    changed = [k for k, v in reloaded.state_dict().items() if k in before and not torch.equal(v.cpu(), before[k].cpu())]
    assert len(changed) > 0.5 * len(before)
    assert 0 < steps[-1]["kl"] < 1 and steps[0]["grad/norm"] > 0


def test_resume_continues_from_the_checkpoint(tmp_path, music_data, default_tokenizer):
    cfg = _config(tmp_path, music_data, "run.save_every=1", "run.eval_examples=0", "grpo.steps=2")
    task = VaryingRewardTask(cfg.task, default_tokenizer)
    run_dir = train(cfg.model, cfg.sampling, cfg.grpo, cfg.run, task, full_config=cfg)
    first = [r for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in first] == [1, 2]
    cfg2 = _config(tmp_path, music_data, "run.save_every=1", "run.eval_examples=0", "grpo.steps=3",
                   "run.resume=latest")
    train(cfg2.model, cfg2.sampling, cfg2.grpo, cfg2.run, task, full_config=cfg2)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # steps 1-2 kept once, step 3 added after the resume
    assert (run_dir / "checkpoints" / "step_3").exists()


def test_resume_reproduces_an_uninterrupted_run(tmp_path, music_data, default_tokenizer):
    """Same seed: 2 steps + resume for a 3rd gives the same weights as 3 steps straight."""
    task_cfg = _config(tmp_path, music_data).task
    task = VaryingRewardTask(task_cfg, default_tokenizer)
    straight = load_experiment(f"{REPO_CONFIGS}/smoke.yaml", [f"task.data_dir={music_data}", "run.eval_examples=0",
                                                             f"run.output_dir={tmp_path / 'a'}"])
    train(straight.model, straight.sampling, straight.grpo, straight.run, task)
    part = load_experiment(f"{REPO_CONFIGS}/smoke.yaml", [f"task.data_dir={music_data}", "run.eval_examples=0",
                                                         f"run.output_dir={tmp_path / 'b'}", "grpo.steps=2",
                                                         "run.save_every=1"])
    train(part.model, part.sampling, part.grpo, part.run, task)
    rest = load_experiment(f"{REPO_CONFIGS}/smoke.yaml", [f"task.data_dir={music_data}", "run.eval_examples=0",
                                                         f"run.output_dir={tmp_path / 'b'}", "run.resume=latest"])
    train(rest.model, rest.sampling, rest.grpo, rest.run, task)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "checkpoints" / "step_3" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step_3" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
