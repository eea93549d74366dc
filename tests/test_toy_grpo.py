"""GRPO end to end on a toy task: a tiny random Qwen2 learns to write the letter `a`.

No data, no converted model, no download: a character-level tokenizer is written to a temporary folder, the
model is built from random weights, and `grpo.train.train` runs the whole loop (sampling, rewards, group
advantages, clipped surrogate, AdamW). The task below is all the engine is told about the problem; nothing in
it is about recommendation, which is the point: the engine knows nothing of recommendation, only prompts,
completions and the rewards a task gives them.
"""
import random

import pytest
import torch

from conftest import TINY_QWEN2
from grpo.config import GRPOConfig, ModelConfig, RunConfig, SamplingConfig
from grpo.runlog import read_jsonl
from grpo.train import train

LETTERS = "abcdefgh"
STEPS, LR = 20, 1e-2  # learnt by step ~12 at this rate (seeds 0, 1, 2: reward ~0.1 -> ~1.0)


@pytest.fixture
def one_thread():
    """A model this small gains nothing from threads, and on a busy 2-core machine two threads contending with
    other work made the run ~30x slower (60-90 s instead of 2-8 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_char_tokenizer(folder):
    """A Hugging Face tokenizer with one token per letter (plus <pad>, <eos>, <unk>), saved to `folder`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<eos>", "<unk>", *LETTERS]
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character a token
    tokenizer.decoder = decoders.Fuse()  # decode "a", "b" to "ab", not "a b"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)
    return str(folder)


class LetterATask:
    """Prompts are random letters; a completion earns the share of its letters that are `a`."""
    curve_keys: list[str] = []

    def items(self, split: str) -> list[dict]:
        rng = random.Random(split)
        return [{"id": f"{split}{i}", "prompt": "".join(rng.choices(LETTERS, k=rng.randint(2, 6)))}
                for i in range(16)]

    def reward(self, item: dict, completion: str) -> tuple[float, dict[str, float]]:
        share = completion.count("a") / max(len(completion), 1)
        return share, {"share_a": share}

    def evaluate(self, items: list[dict], completions: list[str]) -> dict[str, float]:
        return {"share_a": sum(self.reward(i, c)[0] for i, c in zip(items, completions)) / max(len(items), 1)}

    def describe(self, item: dict, completion: str) -> dict:
        return {"a_count": completion.count("a")}


@pytest.mark.parametrize("paths", ["fast", "reference"])
def test_grpo_learns_a_toy_task_with_a_character_tokenizer(tmp_path, one_thread, paths):
    # `reference`: the plain sampler (grpo/sampler.py) and the plain scorer (grpo/logprobs.py) end to end
    run_dir = train(
        ModelConfig(tokenizer=write_char_tokenizer(tmp_path / "tokenizer"), random_init=dict(TINY_QWEN2),
                    device="cpu"),
        SamplingConfig(max_new_tokens=8, decoder=paths),
        GRPOConfig(steps=STEPS, batch_prompts=4, group_size=8, lr=LR, logprobs=paths),
        RunConfig(output_dir=str(tmp_path / "run"), eval_examples=8, eval_at_start=True, plot=False),
        LetterATask())
    rows = read_jsonl(run_dir / "metrics.jsonl")
    rewards = [row["reward/mean"] for row in rows if "reward/mean" in row]
    assert len(rewards) == STEPS
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5  # a random model writes `a` ~1 time in 11
    assert last > 0.8 and last > first + 0.4, (first, last, rewards)
    evals = {row["step"]: row["eval/share_a"] for row in rows if "eval/share_a" in row}
    assert sorted(evals) == [0, STEPS] and evals[STEPS] > evals[0] + 0.4, evals  # greedy answers learnt it too
