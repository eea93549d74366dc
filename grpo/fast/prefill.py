"""Prefill with the prompts' common prefix run once.

Shapes: B prompts, P (left-padded) prompt length, P0 shared prefix length, S = P - P0, V vocabulary.

A batch of this project's prompts shares most of its tokens: the system message and the worked example come
before anything about the user (677 of ~1,030 tokens on the Amazon music sample with the default template).
Prefilling them once instead of B times takes most of the prefill's work away, and the prefill is about
two thirds of a greedy evaluation's time on a CPU. The keys and values of the prefix are the same for every prompt (the
same tokens at the same positions 0..P0-1), so they are computed for one row and broadcast to B.

The cache this leaves is laid out [prefix | padding | own tokens]: each prompt's padding sits between the
shared prefix and its own remaining tokens, instead of in front of the whole prompt. Both layouts have P
columns and the same real tokens at the same positions; `cache_mask` says which columns are real, and the
decoder builds its attention masks from it instead of from the left-padded prompt mask.
"""
from __future__ import annotations

import torch

from grpo.sampler import cache_keyword, left_pad, positions_from_mask


def shared_prefix_length(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """How many leading real tokens every prompt has in common, leaving each at least one token of its own
    (the prefill's last position must be each prompt's own last token)."""
    lengths = prompt_mask.sum(-1).tolist()  # B ints
    P = prompt_ids.shape[1]
    rows = [prompt_ids[b, P - n:] for b, n in enumerate(lengths)]  # real tokens of each prompt
    limit = min(lengths) - 1
    first = rows[0][:limit]  # (limit,)
    same = torch.ones(limit, dtype=torch.bool, device=prompt_ids.device)  # (limit,)
    for row in rows[1:]:
        same &= row[:limit] == first
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else limit


def run_shared_prefix(forward, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cache,
                      share: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prefill the prompts' (B, P) common prefix into `cache` (a Hugging Face DynamicCache) once and broadcast
    it to the B rows. `forward`: the model or its body. Returns what the next forward must run: each prompt's
    remaining tokens (B, S), left-padded; the mask of the cache's columns once they have run (B, P); and the
    prefix length P0 (0: nothing shared, the prompts themselves and their mask come back). Autograd sums the
    B rows' gradients into the one prefix."""
    B, P = prompt_ids.shape
    P0 = shared_prefix_length(prompt_ids, prompt_mask) if share and B > 1 else 0
    if P0 == 0:
        return prompt_ids, prompt_mask, 0
    lengths = prompt_mask.sum(-1).tolist()
    prefix = prompt_ids[:1, P - lengths[0]:P - lengths[0] + P0]  # (1, P0) the shared tokens
    positions = torch.arange(P0, device=prompt_ids.device)[None]  # (1, P0)
    forward(input_ids=prefix, position_ids=positions, use_cache=True, **{cache_keyword(forward): cache})
    for layer in cache.layers:  # one row's keys/values, read by all B (the next forward concatenates)
        layer.keys = layer.keys.expand(B, -1, -1, -1)  # (1, h, P0, d) -> (B, h, P0, d)
        layer.values = layer.values.expand(B, -1, -1, -1)
    own = [prompt_ids[b, P - n + P0:].tolist() for b, n in enumerate(lengths)]
    own_ids, own_mask = left_pad(own, pad_id=int(prompt_ids[0, 0]), device=prompt_ids.device)  # (B, S) each
    cache_mask = torch.cat([prompt_mask.new_ones(B, P0), own_mask.to(prompt_mask.dtype)], dim=1)  # (B, P)
    return own_ids, cache_mask, P0


def prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cache,
            share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompts (B, P) into `cache` (a Hugging Face DynamicCache). Returns the next-token logits (B, V)
    and the cache's column mask (B, P): the prompt mask itself, or, where a prefix was shared, the
    [prefix | padding | own tokens] layout's."""
    ids, cache_mask, P0 = run_shared_prefix(model, prompt_ids, prompt_mask, cache, share_prefix)  # (B, S), (B, P)
    out = model(input_ids=ids, attention_mask=cache_mask, position_ids=positions_from_mask(cache_mask)[:, P0:],
                use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    return out.logits[:, -1, :], cache_mask  # (B, V), (B, P)
