"""SFT warm start: only completion tokens carry loss, micro-batching does not change the gradient, and a
short run on a tiny random model memorises its pairs, keeps the best checkpoint and stops early."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ctrl_c_at_call, tiny_model
from grpo.config import ModelConfig, RunConfig, SamplingConfig, load_config
from grpo.logprobs import completion_logprobs
from grpo.runlog import read_jsonl
from grpo.sft import (SFTConfig, SFTExample, accumulate_sft_gradients, collate, encode_pairs, right_pad, sft_loss,
                      train_sft, validation_loss)
from grpo.policy import Policy

PAD = EOS = 1  # as in SmolLM2: the pad id is the EOS id, so masks must never come from the pad id


def tiny_policy(seed: int = 0) -> Policy:
    return Policy(model=tiny_model(seed=seed), tokenizer=None, eos_ids=[EOS], pad_id=PAD, autocast_dtype=None)


EXAMPLES = [SFTExample([5, 6, 7], [8, 9, EOS]), SFTExample([10], [11, EOS]),
            SFTExample([12, 13, 14, 15, 16], [17, 18, 19, 20, EOS]), SFTExample([21, 22], [EOS])]


# ----------------------------------------------------------------------------------------------------
# Data and masks
# ----------------------------------------------------------------------------------------------------
def test_right_pad_mask_comes_from_lengths_not_the_pad_id():
    ids, mask = right_pad([[4, EOS], [EOS], [4, 5, 6]], pad_id=EOS)
    assert ids.tolist() == [[4, EOS, EOS], [EOS, EOS, EOS], [4, 5, 6]]
    assert mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]  # each row's own EOS is kept, fillers are not


def test_collate_left_pads_prompts_and_right_pads_completions():
    prompt_ids, prompt_mask, completion_ids, completion_mask = collate(EXAMPLES[:2], PAD)
    assert prompt_ids.tolist() == [[5, 6, 7], [PAD, PAD, 10]] and prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert completion_ids.tolist() == [[8, 9, EOS], [11, EOS, PAD]]
    assert completion_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_encode_pairs_appends_eos_and_cuts_long_targets(default_tokenizer):
    tok = default_tokenizer
    eos = tok.eos_token_id
    [short, long] = encode_pairs(tok, [("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<rate>4</rate>"),
                                       ("x", "one two three four five six seven")], eos, max_completion_tokens=3)
    assert short.prompt_ids == tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
                                   add_special_tokens=False)["input_ids"]
    target = tok("<rate>4</rate>", add_special_tokens=False)["input_ids"]
    assert short.completion_ids == (target + [eos])[:3]
    assert long.completion_ids == tok("one two three four five six seven", add_special_tokens=False)["input_ids"][:3]
    assert eos not in long.completion_ids  # a cut trace is not taught to stop
    [full] = encode_pairs(tok, [("x", "<rate>4</rate>")], eos, max_completion_tokens=1024)
    assert full.completion_ids == target + [eos]


# ----------------------------------------------------------------------------------------------------
# The loss: only completion tokens count
# ----------------------------------------------------------------------------------------------------
def test_sft_loss_by_hand_ignores_masked_positions():
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft_loss(logp, mask, total_tokens=3).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    changed = logp.clone()
    changed[mask == 0] = -100.0
    assert sft_loss(changed, mask, total_tokens=3).item() == pytest.approx(2.0)


def _loss_and_final_hidden_grad(policy, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """The SFT loss of one batch and the gradient w.r.t. the final hidden states (n, P + T, H), which are
    what the LM head turns into logits: a zero gradient there = a zero gradient w.r.t. those logits."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["hidden"] = output

    handle = policy.model.model.norm.register_forward_hook(keep)
    logp = completion_logprobs(policy.model, prompt_ids, prompt_mask, completion_ids, completion_mask)  # (n, T)
    loss = sft_loss(logp, completion_mask, completion_mask.sum())
    loss.backward()
    handle.remove()
    return loss.item(), captured["hidden"].grad


def test_only_positions_that_predict_completion_tokens_get_gradient():
    policy = tiny_policy()
    batch = collate(EXAMPLES[:2], PAD)
    _, grad = _loss_and_final_hidden_grad(policy, *batch)
    norms = grad.norm(dim=-1)  # (n, P + T)
    P = batch[0].shape[1]
    # Position j predicts token j + 1: positions P-1 ... P-1+len-1 predict the completion; every other one
    # (the prompt's own tokens, the padding, the last completion token) gets exactly zero gradient.
    for row, example in enumerate(EXAMPLES[:2]):
        predicts_completion = torch.zeros(norms.shape[1], dtype=torch.bool)
        predicts_completion[P - 1:P - 1 + len(example.completion_ids)] = True
        assert torch.all(norms[row, ~predicts_completion] == 0), norms[row]
        assert torch.all(norms[row, predicts_completion] > 0), norms[row]


def test_loss_ignores_padding_ids_and_masked_tail_tokens():
    policy = tiny_policy()
    prompt_ids, prompt_mask, completion_ids, completion_mask = collate(EXAMPLES[:2], PAD)
    loss, _ = _loss_and_final_hidden_grad(policy, prompt_ids, prompt_mask, completion_ids, completion_mask)
    # other ids under the masks: left padding of the prompt, filler after the completion
    prompt_ids2 = prompt_ids.masked_fill(prompt_mask == 0, 77)
    completion_ids2 = completion_ids.masked_fill(completion_mask == 0, 99)
    loss2, _ = _loss_and_final_hidden_grad(tiny_policy(), prompt_ids2, prompt_mask, completion_ids2, completion_mask)
    assert loss2 == pytest.approx(loss, abs=1e-6)
    # but changing a kept completion token does change it (the test can fail)
    completion_ids3 = completion_ids.clone()
    completion_ids3[0, 0] = 55
    loss3, _ = _loss_and_final_hidden_grad(tiny_policy(), prompt_ids, prompt_mask, completion_ids3, completion_mask)
    assert abs(loss3 - loss) > 1e-4


def test_micro_batch_split_gives_the_full_batch_gradient():
    grads, losses = {}, {}
    for micro in (1, 2, 4):
        policy = tiny_policy()
        policy.model.train()
        losses[micro], tokens = accumulate_sft_gradients(policy, EXAMPLES, micro_batch_size=micro)
        grads[micro] = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
        assert tokens == 3 + 2 + 5 + 1
    for micro in (1, 2):
        torch.testing.assert_close(grads[micro], grads[4], rtol=1e-4, atol=1e-6)
        assert losses[micro] == pytest.approx(losses[4], rel=1e-5)
    # and the loss is the token-weighted mean NLL, the same number the validation loss reports
    assert losses[4] == pytest.approx(validation_loss(tiny_policy(), EXAMPLES, batch_size=3), rel=1e-5)


def test_the_fast_scorer_gives_the_reference_loss_and_gradient_with_a_common_prefix():
    # prompts that start alike (a template's system message and worked example), of ragged lengths
    common = [30, 31, 32, 33]
    examples = [SFTExample(common + e.prompt_ids, e.completion_ids) for e in EXAMPLES]
    results = {}
    for scorer in ("reference", "fast"):
        policy = tiny_policy()
        policy.model.train()
        loss, _ = accumulate_sft_gradients(policy, examples, micro_batch_size=4, logprobs=scorer)
        grads = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
        results[scorer] = loss, grads, validation_loss(tiny_policy(), examples, batch_size=4, logprobs=scorer)
    assert results["fast"][0] == pytest.approx(results["reference"][0], rel=1e-5)
    torch.testing.assert_close(results["fast"][1], results["reference"][1], rtol=1e-4, atol=1e-6)
    assert results["fast"][2] == pytest.approx(results["reference"][2], rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Short runs on a tiny random model with the default tokenizer
# ----------------------------------------------------------------------------------------------------
PAIRS = [("<|im_start|>user\nRate Abbey Road<|im_end|>\n<|im_start|>assistant\n", "<rate>5</rate>"),
         ("<|im_start|>user\nRate some noise<|im_end|>\n<|im_start|>assistant\n", "<rate>1</rate>"),
         ("<|im_start|>user\nRate a fine album<|im_end|>\n<|im_start|>assistant\n", "<rate>4</rate>")]


class ExactMatchTask:
    """A stand-in task: its greedy-decoding metric is the share of completions equal to the target."""
    curve_keys = ["eval/exact"]

    def evaluate(self, items, completions):
        return {"exact": sum(c.strip() == it["target"] for it, c in zip(items, completions)) / len(items)}


def _model_cfg() -> ModelConfig:
    cfg = load_config(ModelConfig, None, [])
    cfg.tokenizer = "default"
    cfg.device = "cpu"
    cfg.random_init = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                       "tie_word_embeddings": True}
    return cfg


def test_short_run_memorises_pairs_and_writes_its_files(tmp_path, default_tokenizer):
    from transformers import AutoModelForCausalLM

    cfg = SFTConfig(max_steps=60, batch_size=2, micro_batch_size=1, lr=5e-3)
    run = RunConfig(output_dir=str(tmp_path / "sft"), eval_batch_size=4, plot=False, eval_every=20)
    pairs = PAIRS[:2]
    items = [{"id": i, "prompt": p, "target": c} for i, (p, c) in enumerate(pairs)]
    run_dir = train_sft(_model_cfg(), cfg, run, pairs, pairs, sampling=SamplingConfig(max_new_tokens=12),
                        task=ExactMatchTask(), val_items=items)

    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "sft/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 61))
    assert {"sft/loss", "sft/tokens", "grad/norm", "lr", "time/step_s"} <= set(train_rows[0])
    assert train_rows[-1]["sft/loss"] < 0.05 * train_rows[0]["sft/loss"]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40, 60] and "eval/exact" in evals[0] and "eval/len_mean" in evals[0]
    assert evals[-1]["eval/loss"] < 0.05 * evals[0]["eval/loss"]
    assert evals[0]["eval/exact"] == 0.0 and evals[-1]["eval/exact"] == 1.0  # greedy decoding reproduces the
    assert evals[-1]["eval/len_mean"] < 12  # memorised targets and stops (EOS learned) before the token limit

    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["step"] == 60 and summary["stopped_early"] is False
    assert summary["best_eval_loss"] == pytest.approx(min(r["eval/loss"] for r in evals))
    best = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "best")
    final = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step_60")
    assert (run_dir / "checkpoints" / "step_60" / "trainer_state.pt").exists()
    if summary["best_step"] == 60:
        for (k, a), b in zip(best.state_dict().items(), final.state_dict().values()):
            assert torch.equal(a, b), k


def test_early_stopping_when_validation_loss_cannot_improve(tmp_path, default_tokenizer):
    cfg = SFTConfig(max_steps=20, batch_size=2, micro_batch_size=2, lr=0.0, patience=2)
    run = RunConfig(output_dir=str(tmp_path / "sft"), plot=False, eval_every=1)
    run_dir = train_sft(_model_cfg(), cfg, run, PAIRS, PAIRS[:2])

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 1, 2]  # best at 0, then 2 evals without a gain
    assert max(r["step"] for r in rows) == 2
    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["stopped_early"] is True and summary["best_step"] == 0 and summary["step"] == 2
    assert (run_dir / "checkpoints" / "best" / "config.json").exists()
    assert (run_dir / "checkpoints" / "step_2").is_dir()


@pytest.mark.parametrize("lr", [1e-3, 0.0])  # 0: every evaluation ties, so the best stays step 0's across the resume
def test_sft_stopped_by_ctrl_c_resumes_to_the_weights_of_an_uninterrupted_run(lr, tmp_path, default_tokenizer,
                                                                               monkeypatch):
    # SIGINT during step 3's gradients: the step finishes, step_3 is saved with the early-stopping record,
    # and run.resume=latest ends where an uninterrupted run ends, curves and best checkpoint included.
    from grpo import sft as sft_module
    from grpo.runlog import run_finished

    cfg = SFTConfig(max_steps=4, batch_size=2, micro_batch_size=2, lr=lr)

    def run(name, **kw):
        run_cfg = RunConfig(output_dir=str(tmp_path / name), plot=False, eval_every=2, **kw)
        return train_sft(_model_cfg(), cfg, run_cfg, PAIRS, PAIRS[:2])

    whole = run("whole")
    real = ctrl_c_at_call(monkeypatch, sft_module, "accumulate_sft_gradients", 3)
    part = run("part")
    assert not run_finished(part) and not (part / "eval.json").exists()
    assert max(r["step"] for r in read_jsonl(part / "metrics.jsonl")) == 3 and (part / "checkpoints" / "step_3").is_dir()
    monkeypatch.setattr(sft_module, "accumulate_sft_gradients", real)
    run("part", resume="latest")
    assert run_finished(part)

    def curve(folder):
        return [(r["step"], r.get("sft/loss"), r.get("eval/loss")) for r in read_jsonl(folder / "metrics.jsonl")]

    assert curve(part) == curve(whole)
    summaries = [{k: json.loads((folder / "eval.json").read_text())[k] for k in ("best_step", "best_eval_loss")}
                 for folder in (whole, part)]
    assert summaries[0] == summaries[1]
    evals = [(r["eval/loss"], r["step"]) for r in read_jsonl(whole / "metrics.jsonl") if "eval/loss" in r]
    saved = torch.load(part / "checkpoints" / "step_3" / "trainer_state.pt", weights_only=True)["loop"]["best"]
    assert (saved["loss"], saved["step"]) == min(e for e in evals if e[1] <= 3)  # the record crossed the resume
    for name in ("best", "step_4"):
        a, b = (load_file(folder / "checkpoints" / name / "model.safetensors") for folder in (whole, part))
        assert all(torch.equal(a[k], b[k]) for k in a), name
