"""The fast sampler: the plain sampler's loop (grpo/sampler.py), with the same tokens and log-probs, made cheap.

Shapes: B prompts, G completions per prompt, N = B*G rows, P (left-padded) prompt length,
T completion length (<= max_new_tokens), V vocabulary.

What it changes, never the distribution: each prompt is prefilled once for its G rows (the plain loop
prefills G copies); one decode step (the preallocated KV cache, the attention over it, the CUDA graph that
replays it) is `grpo.fast.decode`'s; the host asks "has every row finished?" only every `sync_every` steps
(stop strings are checked then too, over the steps since the last check); at those points rows that have
finished are dropped from the decode batch once at most half of it is still running (`compact`).
"""
from __future__ import annotations

import torch

from grpo.fast.decode import bucket_size, make_decoder
from grpo.sampler import Rollout, StopStrings, check_sampling, draw, filter_logits, left_pad


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    *,
    group_size: int = 1,
    max_new_tokens: int = 256,
    eos_ids: list[int] | set[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    stop: StopStrings | None = None,
    sync_every: int = 1,
    cache_impl: str = "static",
    cuda_graphs: bool | None = None,
    compact: bool = True,
    decode_options: dict | None = None,
) -> Rollout:
    """Sample `group_size` completions for each prompt (token id lists). The model stays in eval mode.

    cache_impl: 'static' (preallocated, grpo/fast/decode.py) or 'dynamic' (Hugging Face's growing cache, the
    reference). cuda_graphs: None = replay the decode step as a CUDA graph where possible (CUDA, no autocast).
    compact: drop finished rows from the decode batch (at sync points).
    decode_options: passed to `grpo.fast.decode.make_decoder`: split_cache, packed_weights (the CPU savings, on by
    default in float32), grid_cache, stacked_weights, fused_ops (the CUDA savings; see grpo/fast/decode.py for
    where each is on by default); set one False to measure what it saves.
    An empty `eos_ids` never stops on a token (every row runs to max_new_tokens or a stop string).
    """
    check_sampling(temperature, greedy)
    if sync_every < 1:
        raise ValueError("sync_every must be >= 1")
    device = next(model.parameters()).device
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)  # (E,)
    G = group_size

    # ---- prefill: each distinct prompt once, its cache shared by its G rows --------------------------
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)  # (B, P), (B, P)
    B, P = prompt_ids.shape
    N = B * G
    decoder = make_decoder(model, cache_impl, P, max_new_tokens, cuda_graphs, **(decode_options or {}))
    next_logits = decoder.prefill(prompt_ids, prompt_mask, G, max_new_tokens)  # (N, V)
    prompt_ids = prompt_ids.repeat_interleave(G, dim=0)  # (N, P)
    prompt_mask = prompt_mask.repeat_interleave(G, dim=0)  # (N, P)

    # ---- decode: one token per row per step, into preallocated buffers ----------------------------------
    # Outputs are indexed by row (N); the decode batch by slot (n <= N): slot_rows[s] is the row in slot s.
    slot_rows = torch.arange(N, device=device)  # (n,)
    position = prompt_mask.sum(-1)  # (n,) next position of each slot's row
    completion_ids = torch.full((N, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (N, T)
    logp = torch.zeros((N, max_new_tokens), dtype=torch.float32, device=device)  # (N, T)
    finished = torch.zeros(N, dtype=torch.bool, device=device)  # (N,)
    length = torch.full((N,), max_new_tokens, dtype=torch.long, device=device)  # (N,) tokens kept per row
    can_compact = compact and decoder.can_compact
    # Stop strings need the text on the host: checked at the sync points, over every step since the last check.
    stop_checked = 0  # steps [0, stop_checked) have been checked for stop strings
    steps_done = 0
    for t in range(max_new_tokens):
        # (n, V) float32. No copy where it already is (a CUDA graph's output buffer: every read below is queued
        # before the next step's replay overwrites it); nothing below writes into it in place.
        logits = next_logits.float()
        if not greedy and temperature != 1.0:
            logits = logits / temperature
        logprobs = torch.log_softmax(logits, -1)  # (n, V) the distribution the trainer scores (greedy: T = 1)
        if greedy:
            token = logits.argmax(-1)  # (n,)
        else:
            allowed = filter_logits(logits, top_k, top_p)  # (n, V) which tokens may be drawn (the same tensor
            token = draw(allowed, generator)  # (n,)           when neither top-k nor top-p is set)
        token_logp = logprobs.gather(-1, token[:, None]).squeeze(-1)  # (n,)
        slot_done = finished[slot_rows]  # (n,)
        token = token.masked_fill(slot_done, pad_id)  # finished rows emit pad
        completion_ids[slot_rows, t] = token
        logp[slot_rows, t] = token_logp.masked_fill(slot_done, 0.0)
        steps_done = t + 1

        newly_done = torch.zeros_like(finished)  # (N,)
        newly_done[slot_rows] = ~slot_done & torch.isin(token, eos)  # stopped by an EOS token (kept in the mask)
        last_step = t == max_new_tokens - 1
        sync_now = last_step or (t + 1) % sync_every == 0
        if stop is not None and sync_now:
            # rows unfinished before this window; a row whose EOS came first keeps the earlier end (min below)
            candidates = set((~finished).nonzero().flatten().tolist())
            for s in range(stop_checked, t + 1):
                hits = stop(completion_ids, sorted(candidates), s) if candidates else []
                for row in hits:
                    length[row] = min(int(length[row]), s + 1)
                    newly_done[row] = True
                candidates.difference_update(hits)
            stop_checked = t + 1
        length = length.masked_fill(newly_done & (length == max_new_tokens), t + 1)
        finished = finished | newly_done
        if last_step:
            break
        if sync_now:  # the only host synchronisation of a plain sampling step
            still_running = ~finished[slot_rows]  # (n,)
            active = int(still_running.sum())
            if active == 0:
                break
            size = bucket_size(active, slot_rows.shape[0])
            if can_compact and size < slot_rows.shape[0]:
                # running slots first (stable), then finished ones as filler up to the bucket size
                keep = torch.argsort((~still_running).to(torch.int8), stable=True)[:size]  # (m,)
                decoder.compact(keep)
                slot_rows, position, token = slot_rows[keep], position[keep], token[keep]

        next_logits = decoder.step(token, position, t)  # (n, V) logits for step t + 1
        position = position + 1
    decoder.close()  # free the KV cache (and any CUDA graph) before anyone trains on this batch
    del decoder, next_logits

    T = steps_done
    completion_mask = (torch.arange(T, device=device)[None, :] < length[:, None]).float()  # (N, T)
    completion_ids = torch.where(completion_mask.bool(), completion_ids[:, :T], pad_id)  # (N, T) pad after the end
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        truncated=~finished,
        logp=logp[:, :T] * completion_mask,
        group_size=G,
    )
