"""The rollout sampler: batched autoregressive sampling with a KV cache, written out step by step.

Shapes: B prompts, G completions per prompt, N = B*G rows, P (left-padded) prompt length,
T completion length (<= max_new_tokens), V vocabulary.

Why not `model.generate`: we need, per completion, exactly what the GRPO loss needs (the mask that keeps
the EOS token, whether it was truncated, the log-probs of the distribution that sampled), and we want each
prompt's prefill computed once and shared by its G completions (`generate` repeats the prompt G times and
prefills every copy). The loop is here; one decode step (the KV cache, the attention over it, the CUDA
graph that replays it) is in grpo/decode.py. Prefill is Hugging Face's forward pass.

Speed without changing the distribution: each prompt is prefilled once for its G rows; the host asks "has
every row finished?" only every `sync_every` steps (stop strings are checked then too, over the steps since
the last check); at those points rows that have finished are dropped from the decode batch once at most half
of it is still running (`compact`); nothing else waits for the device.

Three details that silently break GRPO when wrong (docs/grpo.md, traps):
- Left padding needs explicit position ids (cumsum of the attention mask - 1), or every padded prompt's
  positions shift by its pad count (trap 2).
- The log-prob of a sampled token is taken from the *temperature-scaled full* distribution, the same one
  the trainer recomputes; top-k / top-p only choose which tokens may be drawn (trap 1).
- A row stops at its first EOS (any id of the generation config) or stop string; the mask keeps that
  token and nothing after it; pad == eos is fine because no mask is ever derived from the pad id (trap 4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grpo.decode import bucket_size, cache_keyword, make_decoder, positions_from_mask  # noqa: F401 (re-exported)


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
    exponentials multinomial draws (measured: 12% of a CPU decode step at V = 49k). The cumulative sum is
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


class Scaffold:
    """Structured decoding: the model writes the body of each section, the decoder writes the headings.

    `sections` is a list of (opening, closing) strings, e.g. [("<a>", "</a>"), ("<b>", "</b>")]. The
    prompt is expected to end with the first opening. A row's current section ends when the model writes
    that section's closing string itself, or when its body reaches `budgets[i]` tokens; then the decoder
    forces the rest: the closing string if the model did not write it, and the next section's opening. The
    model's own text is never edited, only continued; `allowed` can restrict a section to some token ids
    (e.g. the digits of a rating). After the last section the row stops (its closing
    string is made a stop); EOS cannot be sampled before that. Forced tokens carry the model's log-probs like any other, so a rollout stays a
    well-defined sample of the model *conditioned on the headings* (use it for data, not for GRPO).
    """

    def __init__(self, tokenizer, sections: list[tuple[str, str]], budgets: list[int], separator: str = "\n",
                 allowed: list[list[int] | None] | None = None):
        if len(sections) != len(budgets) or not sections:
            raise ValueError("Scaffold needs one budget per section and at least one section")
        if allowed is not None and len(allowed) != len(sections):
            raise ValueError("Scaffold.allowed needs one entry (a token id list or None) per section")
        self.allowed = list(allowed) if allowed is not None else [None] * len(sections)
        self.tokenizer = tokenizer
        self.sections = list(sections)
        self.budgets = list(budgets)
        self.separator = separator
        self.tail_tokens = max(len(c) for _, c in sections) + 1
        self.section: dict[int, int] = {}  # row -> index of the section being written
        self.body_start: dict[int, int] = {}  # row -> step at which the current body began

    def reset(self, rows: int) -> None:
        self.section = {r: 0 for r in range(rows)}
        self.body_start = {r: 0 for r in range(rows)}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, completion_ids: torch.Tensor, active_rows: list[int], step: int) -> dict[int, list[int]]:
        """Rows whose current section just ended -> the token ids to force next."""
        forced = {}
        sep = self.separator
        for row in active_rows:
            i, begin = self.section[row], self.body_start[row]
            if i >= len(self.sections):
                continue
            start = max(begin, step + 1 - self.tail_tokens)
            closing = self.sections[i][1]
            wrote_close = closing in self.tokenizer.decode(completion_ids[row, start:step + 1].tolist())
            if not wrote_close and step + 1 - begin < self.budgets[i]:
                continue
            text = "" if wrote_close else sep + closing
            if i + 1 < len(self.sections):
                text += sep + self.sections[i + 1][0] + sep
            self.section[row] = i + 1
            if text:
                ids = self._encode(text)
                forced[row] = ids
                self.body_start[row] = step + 1 + len(ids)
        return forced

    def constrained_rows(self, rows: list[int]) -> dict[int, list[int]]:
        """Rows (of `rows`) writing a section whose tokens are restricted -> the token ids they may draw."""
        out = {}
        for row in rows:
            i = self.section[row]
            if i < len(self.sections) and self.allowed[i] is not None:
                out[row] = self.allowed[i]
        return out

    def finished(self, row: int) -> bool:
        return self.section.get(row, 0) >= len(self.sections)



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
    scaffold: Scaffold | None = None,
    cuda_graphs: bool | None = None,
    compact: bool = True,
    decode_options: dict | None = None,
) -> Rollout:
    """Sample `group_size` completions for each prompt (token id lists). The model stays in eval mode.

    cache_impl: 'static' (preallocated, grpo/decode.py) or 'dynamic' (Hugging Face's growing cache, the
    reference). cuda_graphs: None = replay the decode step as a CUDA graph where possible (CUDA, no autocast).
    compact: drop finished rows from the decode batch (at sync points, never with a scaffold).
    decode_options: passed to `grpo.decode.make_decoder`: split_cache, packed_weights (the CPU savings, on by
    default in float32), grid_cache, stacked_weights, fused_ops (the CUDA savings; see grpo/decode.py for
    where each is on by default); set one False to measure what it saves.
    An empty `eos_ids` never stops on a token (every row runs to max_new_tokens or a stop string).
    """
    if temperature <= 0 and not greedy:
        raise ValueError("temperature must be > 0 (use greedy=True for argmax decoding)")
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
    can_compact = compact and scaffold is None and decoder.can_compact
    # Stop strings need the text on the host: checked every step with a scaffold (it acts on the next
    # token), else at the sync points, over every step since the last check.
    stop_every = 1 if scaffold is not None else sync_every
    stop_checked = 0  # steps [0, stop_checked) have been checked for stop strings
    steps_done = 0
    forced: dict[int, list[int]] = {}  # scaffold only: row -> token ids still to be written for it
    if scaffold is not None:
        scaffold.reset(N)
    for t in range(max_new_tokens):
        # (n, V) float32. No copy where it already is (a CUDA graph's output buffer: every read below is queued
        # before the next step's replay overwrites it); nothing below writes into it in place.
        logits = next_logits.float()
        if scaffold is not None:  # a scaffolded row ends with its last section, never with an early EOS
            logits = logits.clone()  # edited in place
            logits[:, eos] = float("-inf")
            free = [r for r in (~finished).nonzero().flatten().tolist() if r not in forced]
            for row, ids in scaffold.constrained_rows(free).items():  # e.g. a rating section: digits only
                only = torch.full_like(logits[row], float("-inf"))
                only[ids] = 0.0
                logits[row] = logits[row] + only
        if not greedy and temperature != 1.0:
            logits = logits / temperature
        logprobs = torch.log_softmax(logits, -1)  # (n, V) the distribution the trainer scores (greedy: T = 1)
        if greedy:
            token = logits.argmax(-1)  # (n,)
        else:
            allowed = filter_logits(logits, top_k, top_p)  # (n, V) which tokens may be drawn (the same tensor
            token = draw(allowed, generator)  # (n,)           when neither top-k nor top-p is set)
        token_logp = logprobs.gather(-1, token[:, None]).squeeze(-1)  # (n,)
        if forced:  # scaffold (slots are rows): these rows take their next heading token instead of a sample
            rows = list(forced)
            ids = torch.tensor([forced[r].pop(0) for r in rows], device=device)
            token[rows] = ids
            token_logp[rows] = logprobs[rows].gather(-1, ids[:, None]).squeeze(-1)
            forced = {r: q for r, q in forced.items() if q}
        slot_done = finished[slot_rows]  # (n,)
        token = token.masked_fill(slot_done, pad_id)  # finished rows emit pad
        completion_ids[slot_rows, t] = token
        logp[slot_rows, t] = token_logp.masked_fill(slot_done, 0.0)
        steps_done = t + 1

        newly_done = torch.zeros_like(finished)  # (N,)
        newly_done[slot_rows] = ~slot_done & torch.isin(token, eos)  # stopped by an EOS token (kept in the mask)
        last_step = t == max_new_tokens - 1
        sync_now = last_step or (t + 1) % sync_every == 0
        if stop is not None and (sync_now or (t + 1) % stop_every == 0):
            # rows unfinished before this window; a row whose EOS came first keeps the earlier end (min below)
            candidates = set((~finished).nonzero().flatten().tolist())
            for s in range(stop_checked, t + 1):
                hits = stop(completion_ids, sorted(candidates), s) if candidates else []
                for row in hits:
                    length[row] = min(int(length[row]), s + 1)
                    newly_done[row] = True
                candidates.difference_update(hits)
            stop_checked = t + 1
        if scaffold is not None:
            active = (~finished & ~newly_done).nonzero().flatten().tolist()
            for row, ids in scaffold(completion_ids, [r for r in active if r not in forced], t).items():
                forced[row] = ids
            done_rows = [r for r in active if scaffold.finished(r) and r not in forced]
            if done_rows:
                newly_done[done_rows] = True
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
