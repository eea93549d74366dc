"""Which rows go where: the prompts of each step (a pure function of the seed and the step, so a resumed
run sees the same data) and the micro-batches of an update."""
from __future__ import annotations

import numpy as np
import torch


def data_order(n_items: int, seed: int, epoch: int) -> np.ndarray:
    """The item order of one epoch: a pure function of (seed, epoch), so resuming needs only the step."""
    return np.random.default_rng([seed, epoch]).permutation(n_items)


def batch_indices(n_items: int, batch: int, step: int, seed: int) -> list[int]:
    """Items of `step` (0-based): positions step*batch ... (step+1)*batch - 1 of the endless epoch stream."""
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, n_items)
        out.append(int(data_order(n_items, seed, epoch)[offset]))
    return out


def plan_micro_batches(prompt_mask: torch.Tensor, completion_mask: torch.Tensor, rows_per_batch: int,
                       token_budget: int = 0) -> list[slice]:
    """Consecutive row ranges, one forward/backward each: `rows_per_batch` rows, or with `token_budget` > 0
    as many rows as fit rows x (longest prompt + longest completion among them) <= token_budget, the size
    of the tensor `completion_logprobs` runs once it has trimmed the padding (a row over budget goes alone).
    Memory then follows the tokens, not the row count: many short completions share one pass."""
    N = prompt_mask.shape[0]
    if token_budget <= 0:
        return [slice(i, i + rows_per_batch) for i in range(0, N, rows_per_batch)]
    prompt_len = prompt_mask.sum(-1).tolist()  # (N,) real prompt tokens per row
    completion_len = completion_mask.sum(-1).tolist()  # (N,)
    batches, start, longest_p, longest_c = [], 0, 0, 0
    for row in range(N):
        p, c = max(longest_p, prompt_len[row]), max(longest_c, completion_len[row])
        if row > start and (row - start + 1) * (p + c) > token_budget:
            batches.append(slice(start, row))
            start, p, c = row, prompt_len[row], completion_len[row]
        longest_p, longest_c = p, c
    batches.append(slice(start, N))
    return batches
