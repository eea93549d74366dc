"""Two processes (gloo, CPU device mesh, FSDP2) give the same training as one.

One spawned world of 2 ranks runs every scenario below once (module fixture); each test then runs the same
scenario in this single process and compares. Sampling seeds differ per rank by design, so the rollouts are
*replayed*: `grpo.train.generate` is replaced by a pure function of the prompt text, and a completion is the
same whichever rank samples it. What is compared: the final weights, to 1e-5 at lr 1e-3 (1% of one step:
AdamW turns fp32 summation-order differences of ~1e-7 into a few 1e-6), and the logged step metrics, which
also catch a wrong gradient scale (AdamW alone would hide a factor of 2).
"""
from __future__ import annotations

import os
import random
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments.toy import WordTask
from grpo.config import GRPOConfig, LoRAConfig, ModelConfig, RunConfig, SamplingConfig
from grpo.runlog import read_jsonl
from tests.conftest import TINY_QWEN2, word_tokenizer

WORDS = [f"w{i}" for i in range(45)]  # the words of the toy tokenizer
GRPO_SCENARIOS = {  # name -> (GRPOConfig overrides, ModelConfig overrides)
    "token_mean": ({}, {}),
    "token_mean_kl_budget": ({"beta": 0.1, "micro_batch_tokens": 40}, {}),  # token-budget micro-batches
    "seq_mean": ({"loss_agg": "seq_mean_token_mean"}, {}),
    "seq_mean_kl_mu2": ({"loss_agg": "seq_mean_token_mean", "beta": 0.1, "mu": 2}, {}),
    "lora_kl": ({"beta": 0.1}, {"lora": LoRAConfig(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])}),
}
COMPARED_METRICS = ["reward/mean", "loss/policy", "grad/norm", "kl", "clip/frac", "len/completion_mean"]


# ----------------------------------------------------------------------------------------------------
# Replayed rollouts on the toy task (experiments/toy.py): the engine knows nothing of recommendation
# ----------------------------------------------------------------------------------------------------
_calls = {"n": 0, "crash_at": None}


def replayed_generate(policy, prompts, sampling, *, group_size=1, greedy=False, generator=None, scaffold=None):
    """G completions per prompt as a pure function of (prompt text, g): the same on any rank, any world size."""
    from grpo.sampler import Rollout, left_pad
    from grpo.rollout import encode_prompts

    _calls["n"] += 1
    if _calls["crash_at"] is not None and _calls["n"] > _calls["crash_at"]:
        raise KeyboardInterrupt("killed")  # as a kill between checkpoints would
    prompt_ids, prompt_mask = left_pad(encode_prompts(policy.tokenizer, prompts), policy.pad_id)  # (B, P)
    T, eos, vocab = sampling.max_new_tokens, policy.eos_ids[0], len(policy.tokenizer)
    rows = []
    for text in prompts:
        for g in range(group_size):
            rng = random.Random(f"{text}|{g}")
            n = rng.randint(1, T)
            rows.append([rng.randrange(3, vocab) for _ in range(n - 1)] + [eos if n < T else rng.randrange(3, vocab)])
    completion_ids = torch.full((len(rows), T), policy.pad_id, dtype=torch.long)  # (N, T)
    completion_mask = torch.zeros(len(rows), T)  # (N, T)
    for i, tokens in enumerate(rows):
        completion_ids[i, :len(tokens)] = torch.tensor(tokens)
        completion_mask[i, :len(tokens)] = 1.0
    truncated = torch.tensor([len(t) == T and t[-1] != eos for t in rows])  # (N,)
    return Rollout(prompt_ids.repeat_interleave(group_size, 0), prompt_mask.repeat_interleave(group_size, 0),
                   completion_ids, completion_mask, truncated, torch.zeros(len(rows), T), group_size)


def configs(tokenizer_dir: Path, out: Path, grpo: dict | None = None, model: dict | None = None, **run):
    model_cfg = replace(ModelConfig(tokenizer=str(tokenizer_dir), random_init=dict(TINY_QWEN2), device="cpu"),
                        **(model or {}))
    grpo_cfg = replace(GRPOConfig(steps=3, batch_prompts=4, group_size=2, micro_batch_size=3, lr=1e-3), **(grpo or {}))
    run_cfg = replace(RunConfig(output_dir=str(out), eval_examples=0, eval_at_start=False, samples_every=0, plot=False),
                      **run)
    return model_cfg, SamplingConfig(max_new_tokens=6), grpo_cfg, run_cfg


def run_grpo(tokenizer_dir, out, crash_at=None, **kw) -> Path:
    import grpo.train

    _calls.update(n=0, crash_at=crash_at)
    sampler, grpo.train.generate = grpo.train.generate, replayed_generate
    try:
        return grpo.train.train(*configs(tokenizer_dir, out, **kw), WordTask())
    except KeyboardInterrupt:
        return Path(out)
    finally:
        grpo.train.generate = sampler


def sft_pairs():
    rng = random.Random(5)
    pairs = [(" ".join(rng.choices(WORDS, k=4)), " ".join(rng.choices(WORDS, k=rng.randint(1, 5)))) for _ in range(10)]
    return pairs[:8], pairs[8:]


def run_sft(tokenizer_dir, out) -> Path:
    from grpo.sft import SFTConfig, train_sft

    model_cfg, _, _, run_cfg = configs(tokenizer_dir, out)
    train, val = sft_pairs()
    return train_sft(model_cfg, SFTConfig(max_steps=3, batch_size=4, micro_batch_size=1, lr=1e-3),
                     run_cfg, train, val)


# ----------------------------------------------------------------------------------------------------
# The two-rank world
# ----------------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, tokenizer_dir: str, root: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root = Path(root)
    for name, (grpo_kw, model_kw) in GRPO_SCENARIOS.items():
        run_grpo(tokenizer_dir, root / name, grpo=grpo_kw, model=model_kw)
    # killed during step 3 (after the step-2 checkpoint), then resumed
    killed = run_grpo(tokenizer_dir, root / "killed", crash_at=2, save_every=2)
    if rank == 0:
        shutil.copytree(killed, root / "killed_for_one_process")
    dist.barrier()
    run_grpo(tokenizer_dir, killed, save_every=2, resume="latest")
    run_sft(tokenizer_dir, root / "sft")
    check_decode_copy(root / "decode_copy_ok", rank)
    dist.destroy_process_group()


def check_decode_copy(flag: Path, rank: int) -> None:
    """Shard a model, change its shards, refresh the decode copy: it must equal the same change applied to an
    unsharded twin, parameter by parameter."""
    from grpo.distributed import setup
    from grpo.models import build_random_model
    from grpo.policy import Policy, prepare_training

    full = build_random_model(TINY_QWEN2, vocab_size=48, seed=1, device="cpu", dtype="float32")
    sharded = build_random_model(TINY_QWEN2, vocab_size=48, seed=1, device="cpu", dtype="float32")
    policy = Policy(model=sharded, tokenizer=None, eos_ids=[1], pad_id=0, autocast_dtype=None, dist=setup())
    prepare_training(policy, ModelConfig(), policy.dist, with_reference=False)
    with torch.no_grad():
        for i, (p, q) in enumerate(zip(full.parameters(), sharded.parameters())):
            p.add_(0.01 * (i + 1))
            q.add_(0.01 * (i + 1))  # on this rank's shard only
    policy.weights_changed()
    copy_, _ = policy.decode_model()
    ok = all(torch.equal(a, b) for a, b in zip(copy_.state_dict().values(), full.state_dict().values()))
    ok = ok and len(copy_.state_dict()) == len(full.state_dict())
    if ok and rank == 0:
        flag.write_text("ok")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("two_ranks")
    tokenizer_dir = word_tokenizer(root / "tokenizer")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tokenizer_dir), str(root)), nprocs=2, join=True)
    return root, tokenizer_dir


# ----------------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------------
def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ckpt = max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    files = list(ckpt.glob("adapters.safetensors")) or list(ckpt.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def assert_same_training(one: Path, two: Path, metrics=COMPARED_METRICS, atol=1e-5):
    a, b = final_weights(one), final_weights(two)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=atol, rtol=1e-5, msg=name)
    rows_one = [r for r in read_jsonl(one / "metrics.jsonl") if metrics[0] in r]
    rows_two = [r for r in read_jsonl(two / "metrics.jsonl") if metrics[0] in r]
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] and rows_one
    for r1, r2 in zip(rows_one, rows_two):
        for key in metrics:
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)


@pytest.mark.parametrize("name", list(GRPO_SCENARIOS))
def test_grpo_on_two_ranks_equals_one_process(world, tmp_path, name):
    root, tokenizer_dir = world
    grpo_kw, model_kw = GRPO_SCENARIOS[name]
    one = run_grpo(tokenizer_dir, tmp_path / name, grpo=grpo_kw, model=model_kw)
    assert_same_training(one, root / name)
    weights = final_weights(one)
    if "lora" in name:  # only adapters are stored, and they trained
        assert weights and all("lora_" in k for k in weights)
        assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in weights.items())


def test_killed_and_resumed_on_two_ranks_equals_uninterrupted(world, tmp_path):
    root, tokenizer_dir = world
    assert (root / "killed" / "checkpoints" / "step_3").exists()
    steps = [r["step"] for r in read_jsonl(root / "killed" / "metrics.jsonl") if "reward/mean" in r]
    assert steps == [1, 2, 3]  # the interrupted step's metrics are not duplicated
    uninterrupted = run_grpo(tokenizer_dir, tmp_path / "one", save_every=2)
    assert_same_training(uninterrupted, root / "killed")
    assert_same_training(uninterrupted, root / "token_mean")


def test_two_rank_checkpoint_resumes_in_one_process(world, tmp_path):
    """A different world size: the consolidated weights and the DCP optimizer state load into one process."""
    root, tokenizer_dir = world
    folder = tmp_path / "resumed"
    shutil.copytree(root / "killed_for_one_process", folder)
    assert (folder / "checkpoints" / "step_2" / "optimizer").is_dir()
    run_grpo(tokenizer_dir, folder, save_every=2, resume="latest")
    assert_same_training(root / "token_mean", folder)


def test_two_rank_checkpoint_loads_with_transformers(world):
    from transformers import AutoModelForCausalLM

    root, _ = world
    model = AutoModelForCausalLM.from_pretrained(root / "token_mean" / "checkpoints" / "step_3")
    saved = final_weights(root / "token_mean")
    for name, value in model.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name


def test_sft_on_two_ranks_equals_one_process(world, tmp_path):
    root, tokenizer_dir = world
    one = run_sft(tokenizer_dir, tmp_path / "sft")
    assert_same_training(one, root / "sft", metrics=["sft/loss", "grad/norm", "sft/tokens"])
    evals_one = [r["eval/loss"] for r in read_jsonl(one / "metrics.jsonl") if "eval/loss" in r]
    evals_two = [r["eval/loss"] for r in read_jsonl(root / "sft" / "metrics.jsonl") if "eval/loss" in r]
    assert evals_two == pytest.approx(evals_one, rel=1e-5) and evals_one


def test_refreshed_decode_copy_equals_the_full_weights(world):
    root, _ = world
    assert (root / "decode_copy_ok").read_text() == "ok"


def test_batch_that_does_not_divide_names_the_setting():
    from grpo.distributed import Dist, rank_share

    assert rank_share(8, Dist(rank=1, world_size=4), "grpo.batch_prompts") == slice(2, 4)
    with pytest.raises(ValueError, match="grpo.batch_prompts=6 .* 4 processes"):
        rank_share(6, Dist(rank=0, world_size=4), "grpo.batch_prompts")


def test_equalize_micro_batches_splits_the_largest():
    from grpo.distributed import equalize_micro_batches

    assert equalize_micro_batches([slice(0, 1), slice(1, 5)], 3) == [slice(0, 1), slice(1, 3), slice(3, 5)]
    assert equalize_micro_batches([slice(0, 2)], 1) == [slice(0, 2)]
    with pytest.raises(ValueError):
        equalize_micro_batches([slice(0, 1)], 2)
