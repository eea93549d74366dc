"""CUDA paths: skipped cleanly on machines without a GPU (CI), run on the lent GPU machine."""
import pytest
import torch

from conftest import tiny_model
from grpo.sampler import left_pad, sample

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
    from grpo.policy import completion_logprobs

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
