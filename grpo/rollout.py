"""Generating with the policy: prompts in, completions out, for training (sampled) and evaluation (greedy).

`sampling.decoder` chooses the loop: `reference` (grpo/sampler.py, the plain one to read first) or `fast`
(grpo/fast/, the default; the same tokens and log-probs, tested against each other and `generate`).
"""
from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

from grpo import fast, sampler
from grpo.config import SamplingConfig
from grpo.policy import Policy
from grpo.sampler import Rollout, StopStrings
from grpo.scaffold import Scaffold, sample_scaffolded
from grpo.task import Task


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    # The prompt text already carries the chat template's special tokens: add none.
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def generate(policy: Policy, prompts: list[str], sampling: SamplingConfig, *, group_size: int = 1,
             greedy: bool = False, generator: torch.Generator | None = None,
             scaffold: Scaffold | None = None) -> Rollout:
    """`group_size` completions of each prompt text, by the decoder `sampling.decoder` names (or, for data,
    under a scaffold)."""
    stop = StopStrings(policy.tokenizer, sampling.stop_strings) if sampling.stop_strings else None
    policy.model.eval()  # sampling: no dropout; the KV cache is used (trap 10)
    model, under_autocast = policy.decode_model(sampling.decode_weights)
    args = dict(group_size=group_size, max_new_tokens=sampling.max_new_tokens, eos_ids=policy.eos_ids,
                pad_id=policy.pad_id, temperature=sampling.temperature, greedy=greedy, generator=generator, stop=stop)
    prompt_ids = encode_prompts(policy.tokenizer, prompts)
    with policy.autocast() if under_autocast else nullcontext():
        if scaffold is not None:
            return sample_scaffolded(model, prompt_ids, scaffold, **args)
        if sampling.decoder == "reference":
            return sampler.sample(model, prompt_ids, top_k=sampling.top_k, top_p=sampling.top_p, **args)
        return fast.sample(model, prompt_ids, top_k=sampling.top_k, top_p=sampling.top_p,
                           sync_every=1 if policy.device.type == "cpu" else 8, **args)


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """Completion texts, cut at the stopping token. The EOS token's own text is dropped."""
    texts = []
    for ids, mask in zip(rollout.completion_ids, rollout.completion_mask):
        texts.append(tokenizer.decode(ids[: int(mask.sum())].tolist(), skip_special_tokens=True))
    return texts


def greedy_completions(policy: Policy, prompts: list[str], sampling: SamplingConfig, batch_size: int,
                       progress: bool = False) -> tuple[list[str], list[int]]:
    """Greedy decoding in batches (evaluation): completion texts and their token counts."""
    texts, lengths = [], []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="decode", disable=not progress, leave=False):
        rollout = generate(policy, prompts[start:start + batch_size], sampling, greedy=True)
        texts += decode_completions(policy.tokenizer, rollout)
        lengths += [int(n) for n in rollout.completion_lengths]
    return texts, lengths


def evaluate(policy: Policy, task: Task, items: list[dict], sampling: SamplingConfig, batch_size: int) -> dict:
    """Greedy completions of `items` and the task's metrics. Under torchrun each rank decodes every W-th item
    and every rank then scores all of them."""
    start = time.perf_counter()
    dist = policy.dist
    policy.decode_model(sampling.decode_weights)  # all ranks refresh the decode copy together, first
    mine = items[dist.rank::dist.world_size]
    completions, lengths = greedy_completions(policy, [it["prompt"] for it in mine], sampling, batch_size)
    if dist.enabled:  # one gather for both lists
        completions, lengths = map(list, zip(*dist.unshare(list(zip(completions, lengths)), len(items))))
    metrics = dict(task.evaluate(items, completions))
    metrics["len_mean"] = float(np.mean(lengths)) if lengths else 0.0
    metrics["time_s"] = time.perf_counter() - start
    return metrics
