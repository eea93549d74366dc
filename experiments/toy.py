"""A toy task and a word-level tokenizer: the engine run with nothing of recommendation in it.

Used where the data or the real tokenizer cannot be had: the multi-process tests, and the scale checks on a
GPU machine (scripts/scale_check.py) that build a random model of Qwen2.5-7B's shape without its tokenizer.
The tokenizer maps the words `w0`, `w1`, ... to one id each, so a prompt of n words is n tokens.
"""
from __future__ import annotations

import random
from pathlib import Path


def write_word_tokenizer(folder: str | Path, n_words: int = 45) -> Path:
    """Save a Hugging Face tokenizer of `<pad>`, `<eos>`, `<unk>` and the words w0 .. w{n_words-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(n_words)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)
    return Path(folder)


class WordTask:
    """Prompts of random words; a completion earns the share of its words found in its prompt, plus a little
    for length (so the groups of a random model's completions are rarely tied)."""
    curve_keys: list[str] = []

    def __init__(self, n_items: int = 12, prompt_words: tuple[int, int] = (2, 6), n_words: int = 45):
        self.n_items, self.prompt_words, self.words = n_items, prompt_words, [f"w{i}" for i in range(n_words)]

    def items(self, split: str) -> list[dict]:
        rng = random.Random(split)
        return [{"id": f"{split}{i}", "prompt": " ".join(rng.choices(self.words, k=rng.randint(*self.prompt_words)))}
                for i in range(self.n_items)]

    def reward(self, item: dict, completion: str) -> tuple[float, dict[str, float]]:
        words = completion.split()
        hits = sum(w in item["prompt"].split() for w in words) / max(len(words), 1)
        return hits + 0.1 * len(words), {"hits": hits}

    def evaluate(self, items: list[dict], completions: list[str]) -> dict[str, float]:
        return {"mean_words": sum(len(c.split()) for c in completions) / max(len(completions), 1)}

    def describe(self, item: dict, completion: str) -> dict:
        return {}
