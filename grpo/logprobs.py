"""Scoring completions: the one place that builds the model input `prompt ‖ completion` and turns the
model's hidden states into per-token log-probs of the completion.

Every forward pass that needs log-probs (the policy loss, old log-probs for mu > 1, the frozen reference,
SFT, evaluation checks, tests) goes through `completion_logprobs` or its fast variant
`completion_logprobs_fast` (the same numbers, tested equal; `grpo.logprobs` chooses), so they cannot drift
apart. A model sharded by FSDP2 is called through `grpo.distributed.call`.

Shapes: N rows, P prompt length (left-padded), T completion length (right-padded), H hidden, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from grpo.fast.prefill import run_shared_prefix
from grpo.functional import logprobs_from_hidden
from grpo.sampler import cache_keyword, positions_from_mask


def build_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Concatenate left-padded prompts and right-padded completions: (ids, attention mask, positions)."""
    assert prompt_ids.shape == prompt_mask.shape and completion_ids.shape == completion_mask.shape
    assert prompt_ids.shape[0] == completion_ids.shape[0]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P + T)
    attention_mask = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)  # (N, P + T)
    return input_ids, attention_mask, positions_from_mask(attention_mask)


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                        temperature: float = 1.0, chunk_tokens: int = 1024) -> torch.Tensor:
    """log p(completion token t | prompt, completion[:t]) at `temperature`: (N, T) float32.

    The logits of the whole batch are never materialised: the transformer body runs, the hidden states of
    the T positions that predict completion tokens are kept, and the LM head projects them a chunk of tokens
    at a time (docs/grpo.md trap 11). Masked positions hold garbage; callers mask them."""
    input_ids, attention_mask, position_ids = build_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state  # (N, P + T, H)
    P = prompt_ids.shape[1]
    hidden = hidden[:, P - 1:-1, :]  # (N, T, H): position j predicts token j + 1 (trap 3)
    head = model.get_output_embeddings()
    return logprobs_from_hidden(hidden, head.weight, completion_ids, temperature=temperature,
                                chunk_tokens=chunk_tokens, lm_head_bias=getattr(head, "bias", None))  # (N, T)


def completion_logprobs_fast(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                         temperature: float = 1.0, chunk_tokens: int = 1024,
                         prompt_index: torch.Tensor | None = None, shared_prefix: bool = False) -> torch.Tensor:
    """`completion_logprobs` with less work: the same (N, T) numbers (tests/test_policy.py).

    Only the columns some row uses are run: a micro-batch of short rows runs a short tensor. `prompt_index`
    (N,) says which rows share a prompt (GRPO's G completions of one prompt; rows of a prompt must be
    consecutive): each distinct prompt is then run through the model once and its keys and values are shared
    by its rows, gradient included, instead of running the same prompt G times: B*P + N*T tokens of work
    instead of N*(P + T). `shared_prefix`: the distinct prompts' common leading tokens (a template's system
    message and worked example) are run once for all of them too (grpo/fast/prefill.py). Neither with gradient
    checkpointing (which recomputes a layer without its cache).
    """
    T = completion_ids.shape[1]
    # Exact: what is dropped is left padding of every prompt and right padding of every completion (positions come from
    # the mask, and causality keeps right padding out of earlier tokens). The result is padded back to T.
    first = int(prompt_mask.bool().any(0).long().argmax())  # the first column with a real prompt token
    used = completion_mask.bool().any(0)  # (T,)
    width = int(used.nonzero().max()) + 1 if bool(used.any()) else 1  # completion columns in use
    prompt_ids, prompt_mask = prompt_ids[:, first:], prompt_mask[:, first:]  # (N, P')
    completion_ids, completion_mask = completion_ids[:, :width], completion_mask[:, :width]  # (N, T')
    P = prompt_ids.shape[1]
    body = model.get_decoder()  # the transformer without its LM head
    if (prompt_index is not None or shared_prefix) and not getattr(body, "gradient_checkpointing", False):
        if prompt_index is None:  # every row its own prompt
            prompt_index = torch.arange(prompt_ids.shape[0], device=prompt_ids.device)  # (N,)
        hidden = _shared_prompt_hidden(body, prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index,
                                       shared_prefix)
    else:
        input_ids, attention_mask, position_ids = build_inputs(prompt_ids, prompt_mask, completion_ids,
                                                               completion_mask)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # (N, P + T, H)
        # The hidden state at position j predicts token j + 1 (trap 3): completion token t sits at P + t,
        # so it is predicted from position P + t - 1.
        hidden = hidden[:, P - 1:P + width - 1, :]  # (N, T', H)
    head = model.get_output_embeddings()
    logp = logprobs_from_hidden(hidden, head.weight, completion_ids, temperature=temperature,
                                chunk_tokens=chunk_tokens, lm_head_bias=getattr(head, "bias", None))  # (N, T')
    return F.pad(logp, (0, T - logp.shape[1]))  # (N, T): zeros in the trimmed columns


def _shared_prompt_hidden(body, prompt_ids, prompt_mask, completion_ids, completion_mask, prompt_index,
                          shared_prefix: bool = False):
    """Hidden states (N, T, H) that predict the completion tokens, running each distinct prompt once (and,
    with `shared_prefix`, their common prefix once)."""
    from transformers import DynamicCache

    _, counts = torch.unique_consecutive(prompt_index, return_counts=True)  # (U,) rows per distinct prompt
    first = torch.cumsum(counts, 0) - counts  # (U,) the first row of each prompt
    cache = DynamicCache(config=body.config)
    kw = cache_keyword(body)
    ids, prompt_mask, P0 = run_shared_prefix(body, prompt_ids[first], prompt_mask[first], cache,
                                             shared_prefix)  # (U, S), (U, P) the cache's columns, int
    positions = positions_from_mask(prompt_mask)[:, P0:]  # (U, S)
    prompt_hidden = body(input_ids=ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                         **{kw: cache}).last_hidden_state  # (U, S, H)
    for layer in cache.layers:  # each prompt's keys/values serve all its rows; autograd sums their gradients
        layer.keys = layer.keys.repeat_interleave(counts, dim=0)  # (U, heads, P, d) -> (N, heads, P, d)
        layer.values = layer.values.repeat_interleave(counts, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(counts, dim=0)  # (N, P)
    P = prompt_mask.shape[1]
    attention_mask = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)  # (N, P + T)
    position_ids = positions_from_mask(attention_mask)[:, P:]  # (N, T)
    completion_hidden = body(input_ids=completion_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **{kw: cache}).last_hidden_state  # (N, T, H)
    # completion token 0 is predicted by the last prompt position; token t > 0 by completion position t - 1
    last_prompt = prompt_hidden[:, -1:, :].repeat_interleave(counts, dim=0)  # (N, 1, H)
    return torch.cat([last_prompt, completion_hidden[:, :-1, :]], dim=1)  # (N, T, H)
