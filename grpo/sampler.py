"""The rollout sampler, plain: batched autoregressive sampling with Hugging Face's forward and KV cache.

Shapes: B prompts, G completions per prompt, N = B*G rows, P (left-padded) prompt length,
T completion length (<= max_new_tokens), V vocabulary.

Why not `model.generate`: we need, per completion, exactly what the GRPO loss needs: the mask that keeps
the EOS token, whether the row was truncated, and the log-probs of the distribution that sampled it.

This is the reference a reader should follow first (`sampling.decoder: reference`). grpo/fast/ holds the
decoder that training uses by default: the same loop with each prompt prefilled once for its G rows, a
preallocated cache, finished rows dropped from the batch and (on CUDA) the decode step replayed as a graph;
tests/test_sampler.py holds both to `generate`'s tokens and to a full forward's log-probs.

Three details that silently break GRPO when wrong (docs/grpo.md, traps):
- Left padding needs explicit position ids (cumsum of the attention mask - 1), or every padded prompt's
  positions shift by its pad count (trap 2).
- The log-prob of a sampled token is taken from the *temperature-scaled full* distribution, the same one
  the trainer recomputes; top-k / top-p only choose which tokens may be drawn (trap 1).
- A row stops at its first EOS (any id of the generation config) or stop string; the mask keeps that
  token and nothing after it; pad == eos is fine because no mask is ever derived from the pad id (trap 4).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cache_keyword(model) -> str:
    """transformers >= 5.2x calls the KV-cache argument `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch: 0 at each row's first real token (docs/grpo.md trap 2)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, L)


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (N, P) long, left-padded; row n is prompt n // G
    prompt_mask: torch.Tensor  # (N, P) long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, T) long, pad after the end
    completion_mask: torch.Tensor  # (N, T) float, 1 up to and including the stopping token
    truncated: torch.Tensor  # (N,) bool, True if the row hit max_new_tokens without stopping
    logp: torch.Tensor  # (N, T) float32, sampler log-probs of the sampled tokens (0 where masked)
    group_size: int

    @property
    def prompt_index(self) -> torch.Tensor:  # (N,) which prompt each row belongs to: n // G
        return torch.arange(self.completion_ids.shape[0], device=self.completion_ids.device) // self.group_size

    @property
    def completion_lengths(self) -> torch.Tensor:  # (N,)
        return self.completion_mask.sum(-1)


def left_pad(token_lists: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ragged token lists: (ids (B, P), mask (B, P))."""
    if not token_lists or any(len(t) == 0 for t in token_lists):
        raise ValueError("every prompt needs at least one token")
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)  # (B, P)
    for row, tokens in enumerate(token_lists):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf. (N, V) -> (N, V); a new tensor."""
    out = logits
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]  # (N, 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)  # (N, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)  # (N, V)
        # drop a token when the mass *before* it already reaches top_p (the first token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # (N, V)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (N, V) back in vocab order
        out = out.masked_fill(drop, float("-inf"))
    return out


def draw(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (n, V), with probability softmax(logits) (a -inf logit is never drawn).

    The same distribution on every device, by the method that is cheap there: on a CPU the inverse of the
    cumulative distribution (n random numbers); on a GPU the Gumbel-max trick (n*V random numbers, but every
    step of it is one parallel pass, where the cumulative sum is a sequential scan per row)."""
    if logits.device.type == "cpu":
        return draw_inverse_cdf(F.softmax(logits, -1), generator)
    return draw_gumbel_max(logits, generator)


def draw_gumbel_max(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """argmax_i (logits_i + G_i) with G_i = -log E_i, E_i ~ Exp(1) independent: token i with probability
    softmax(logits)_i exactly (the Gumbel-max trick; the "exponential race" argmin_i E_i / p_i).

    The noise is float64. In float32 it would not be exact enough: torch's float32 Exp(1) draws are >= 2^-24
    and <= ~22, which caps the noise near 16.6 and floors it near -3.1, so a token ~20 nats below the best one
    can never win, while the probability of such tokens, summed over a 152k vocabulary, can reach ~4e-4. In
    float64 the cap is ~36.7 and what is lost is below 1e-12 per draw. (n, V) -> (n,)"""
    noise = torch.empty(logits.shape, dtype=torch.float64, device=logits.device)  # (n, V)
    noise.exponential_(generator=generator).log_()  # log E; torch's Exp(1) draws are > 0, so this is finite
    return (logits - noise).argmax(-1)  # (n,) float32 - float64 -> float64 scores


def draw_inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from probs (n, V), by inverting the cumulative distribution with one uniform per row.

    The same distribution as torch.multinomial(probs, 1), for n random numbers instead of the n*V
    exponentials multinomial draws (a visible share of a CPU decode step: docs/performance.md). The cumulative sum is
    taken in float64 so the rounding of 150k small terms cannot shift a token's interval."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (n, V), accumulated and stored in float64
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)  # (n, 1)
    # token i is drawn when cdf[i-1] <= u * total < cdf[i]; a token of probability 0 has an empty interval
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)  # (n,)
    return token.clamp(max=probs.shape[-1] - 1)


class StopStrings:
    """Detects stop strings in the tail of each row's decoded text (checked every step, so the first
    occurrence is caught when it appears)."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.tail_tokens = max(len(s) for s in self.stop_strings) + 1  # a token is >= 1 character

    def __call__(self, completion_ids: torch.Tensor, active_rows: list[int], step: int) -> list[int]:
        start = max(0, step + 1 - self.tail_tokens)
        hits = []
        for row in active_rows:
            tail = self.tokenizer.decode(completion_ids[row, start:step + 1].tolist())
            if any(s in tail for s in self.stop_strings):
                hits.append(row)
        return hits


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, group_size: int = 1, max_new_tokens: int = 256,
           eos_ids: list[int] | set[int], pad_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
           stop: StopStrings | None = None) -> Rollout:
    """Sample `group_size` completions for each prompt (token id lists): every row its own copy of its prompt,
    one token per row per step, until every row has stopped or `max_new_tokens`. An empty `eos_ids` never
    stops on a token (every row runs to max_new_tokens or a stop string)."""
    from transformers import DynamicCache

    check_sampling(temperature, greedy)
    device = next(model.parameters()).device
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)  # (E,)
    rows = [p for p in prompts for _ in range(group_size)]  # row n is prompt n // G
    prompt_ids, prompt_mask = left_pad(rows, pad_id, device)  # (N, P), (N, P)
    N = prompt_ids.shape[0]
    cache = DynamicCache(config=model.config)  # grows by one position a step
    kw = {cache_keyword(model): cache, "use_cache": True, "logits_to_keep": 1}
    attention = prompt_mask  # (N, P + t): every row attends to its real prompt tokens and all it has written
    position = prompt_mask.sum(-1)  # (N,) the position of each row's next token
    logits = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions_from_mask(attention),
                   **kw).logits[:, -1].float()  # (N, V) the next-token logits after each prompt
    tokens, token_logps = [], []  # one (N,) tensor per step
    finished = torch.zeros(N, dtype=torch.bool, device=device)  # (N,)
    length = torch.full((N,), max_new_tokens, dtype=torch.long, device=device)  # (N,) tokens kept per row
    for t in range(max_new_tokens):
        if not greedy:
            logits = logits / temperature
        logprobs = torch.log_softmax(logits, -1)  # (N, V) the distribution the trainer scores (trap 1)
        token = logits.argmax(-1) if greedy else draw(filter_logits(logits, top_k, top_p), generator)  # (N,)
        token = token.masked_fill(finished, pad_id)  # finished rows emit pad
        tokens.append(token)
        token_logps.append(logprobs.gather(-1, token[:, None]).squeeze(-1).masked_fill(finished, 0.0))  # (N,)
        done = ~finished & torch.isin(token, eos)  # (N,) stopped by an EOS token, which the mask keeps (trap 4)
        if stop is not None:
            written = torch.stack(tokens, 1)  # (N, t + 1)
            done[stop(written, (~finished & ~done).nonzero().flatten().tolist(), t)] = True
        length = length.masked_fill(done, t + 1)
        finished = finished | done
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)  # (N, P + t + 1)
        logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=position[:, None],
                       **kw).logits[:, -1].float()  # (N, V) the cache now holds token t of every row
        position = position + 1
    return make_rollout(prompt_ids, prompt_mask, tokens, token_logps, length, finished, pad_id, group_size)


def make_rollout(prompt_ids, prompt_mask, tokens: list[torch.Tensor], token_logps: list[torch.Tensor],
                 length: torch.Tensor, finished: torch.Tensor, pad_id: int, group_size: int) -> Rollout:
    """The Rollout of a step-by-step loop: its per-step (N,) tokens and log-probs, and each row's kept length."""
    completion_ids = torch.stack(tokens, 1)  # (N, T)
    T = completion_ids.shape[1]
    completion_mask = (torch.arange(T, device=length.device)[None, :] < length[:, None]).float()  # (N, T)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                   completion_ids=torch.where(completion_mask.bool(), completion_ids, pad_id),  # pad after the end
                   completion_mask=completion_mask, truncated=~finished,
                   logp=torch.stack(token_logps, 1) * completion_mask, group_size=group_size)


def check_sampling(temperature: float, greedy: bool) -> None:
    if temperature <= 0 and not greedy:
        raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
