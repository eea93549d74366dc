import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("RECZERO_DATA_DIR", REPO.parent / "shared" / "data"))
TINY_QWEN2 = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.exists():
        pytest.skip(f"shared data not found at {DATA_DIR} (set RECZERO_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def default_tokenizer():
    from grpo.models import default_model_dir, load_tokenizer

    if not (default_model_dir() / "config.json").exists():
        pytest.skip("default model not converted (run `make model`)")
    return load_tokenizer("default")


def tiny_model(vocab_size: int = 128, seed: int = 0, **overrides):
    from grpo.models import build_random_model

    return build_random_model({**TINY_QWEN2, **overrides}, vocab_size=vocab_size, seed=seed, device="cpu",
                              dtype="float32")


def word_tokenizer(folder) -> Path:
    """A tiny word-level tokenizer (`w0` ... `w44`) saved as a Hugging Face folder: no download, no converted model."""
    from experiments.toy import write_word_tokenizer

    return write_word_tokenizer(folder)


def data_sample(folder: str) -> Path:
    """A sample folder of the shared data, or a skip saying where it was looked for."""
    path = DATA_DIR / folder
    if not path.is_dir():
        pytest.skip(f"real data sample {folder!r} not found in {DATA_DIR} (set RECZERO_DATA_DIR)")
    return path


class CharTokenizer:
    """Enough of a tokenizer for `grpo.rollout.generate` on a tiny model: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 120 for c in text]}


def decode_weights_gaps(policy, settings: tuple[str, ...], device: str = "cpu", each=None) -> dict:
    """For each `sampling.decode_weights` setting: sample 2 prompts x 3 through `grpo.rollout.generate` and return
    the max abs gap between the sampler's log-probs and the autocast training forward on the same tokens.
    each(setting) runs after each generation (a check of what the sampler did)."""
    import torch

    from grpo.config import SamplingConfig
    from grpo.logprobs import completion_logprobs
    from grpo.rollout import generate

    gaps = {}
    for setting in settings:
        rollout = generate(policy, ["hello there", "a longer prompt here"],
                           SamplingConfig(max_new_tokens=12, decode_weights=setting), group_size=3,
                           generator=torch.Generator(device=device).manual_seed(0))
        if each is not None:
            each(setting)
        with torch.no_grad(), policy.autocast():
            logp = completion_logprobs(policy.model, rollout.prompt_ids, rollout.prompt_mask,
                                       rollout.completion_ids, rollout.completion_mask)
        m = rollout.completion_mask.bool()
        gaps[setting] = (logp[m] - rollout.logp[m]).abs().max().item()
    return gaps


def ctrl_c_at_call(monkeypatch, module, name: str, n: int):
    """Replace `module.name` by a wrapper that sends this process SIGINT on its n-th call (as Ctrl-C in the
    middle of a training step would), then calls the original; returns the original, to put back."""
    import signal

    real, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
    return real
