"""End-to-end checks with the real default model (SmolLM2-135M-Instruct, converted by `make model`)."""
import pytest
import torch

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def policy(default_tokenizer):
    from grpo.config import ModelConfig
    from grpo.policy import load_policy

    return load_policy(ModelConfig(name_or_path="default", device="cpu"), for_training=False)


@pytest.mark.parametrize("decoder", ["reference", "fast"])
def test_greedy_decoding_of_a_real_prompt_matches_hf_generate(policy, data_dir, tmp_path, decoder):
    from experiments.task import RecTask, TaskConfig
    from grpo import fast, sampler
    from grpo.rollout import encode_prompts
    from grpo.sampler import left_pad
    from recdata.prepare import main as prepare

    out = tmp_path / "music"
    assert prepare(["--dataset", "amazon-music", "--raw-dir", str(data_dir / "amazon-music-2014-sample"),
                    "--out", str(out), "--max-train", "4", "--max-val", "2", "--max-test", "2", "--quiet"]) == 0
    task = RecTask(TaskConfig(data_dir=str(out), one_shot="turn", max_prompt_tokens=600), policy.tokenizer)
    prompts = encode_prompts(policy.tokenizer, [it["prompt"] for it in task.items("train")[:2]])
    sample = sampler.sample if decoder == "reference" else fast.sample
    ours = sample(policy.model, prompts, max_new_tokens=12, eos_ids=policy.eos_ids, pad_id=policy.pad_id, greedy=True)
    ids, mask = left_pad(prompts, policy.pad_id)
    hf = policy.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=policy.pad_id)[:, ids.shape[1]:]
    for row in range(2):
        n = int(ours.completion_mask[row].sum())
        assert ours.completion_ids[row, :n].tolist() == hf[row, :n].tolist()
    assert policy.pad_id in policy.eos_ids  # SmolLM2: pad == eos, handled without deriving masks from pads


def test_default_model_log_probs_agree_between_sampler_and_trainer(policy):
    from grpo.fast import sample
    from grpo.logprobs import completion_logprobs_fast
    from grpo.rollout import encode_prompts

    prompts = encode_prompts(policy.tokenizer, ["<|im_start|>user\nRate this album from 1 to 5.<|im_end|>\n"
                                                "<|im_start|>assistant\n"])
    r = sample(policy.model, prompts, group_size=3, max_new_tokens=10, eos_ids=policy.eos_ids, pad_id=policy.pad_id,
               temperature=0.8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = completion_logprobs_fast(policy.model, r.prompt_ids, r.prompt_mask, r.completion_ids,
                                        r.completion_mask, temperature=0.8, prompt_index=r.prompt_index)
    m = r.completion_mask.bool()
    assert (logp[m] - r.logp[m]).abs().max() < 1e-3
