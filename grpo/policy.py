"""Scoring completions: the one place that builds the model input `prompt ‖ completion` and turns the
model's hidden states into per-token log-probs of the completion.

Every forward pass that needs log-probs (the policy loss, old log-probs for mu > 1, the frozen reference,
evaluation checks, tests) goes through `completion_logprobs`, so they cannot drift apart (DESIGN.md).

Shapes: N rows, P prompt length (left-padded), T completion length (right-padded), H hidden, V vocab.
"""
from __future__ import annotations

import torch

from grpo.functional import logprobs_from_hidden
from grpo.sampler import positions_from_mask


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

    The logits of the whole batch are never materialised: we run the transformer body, keep the hidden
    states of the T positions that predict completion tokens, and project them through the LM head a
    chunk of tokens at a time (GRPO_NOTES trap 11). Masked positions hold garbage; callers mask them.
    """
    input_ids, attention_mask, position_ids = build_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    P = prompt_ids.shape[1]
    T = completion_ids.shape[1]
    body = model.get_decoder()  # the transformer without its LM head
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state  # (N, P + T, H)
    # The hidden state at position j predicts token j + 1 (trap 3): completion token t sits at P + t,
    # so it is predicted from position P + t - 1.
    hidden = hidden[:, P - 1:P + T - 1, :]  # (N, T, H)
    head = model.get_output_embeddings()
    return logprobs_from_hidden(hidden, head.weight, completion_ids, temperature=temperature,
                                chunk_tokens=chunk_tokens, lm_head_bias=getattr(head, "bias", None))  # (N, T)
