"""Scaffolded decoding: the model writes each section's body, the decoder writes the section headings.

For data, not for GRPO: the self-teacher (experiments/coldstart.py) uses it to get well-formed traces out of
a model too small to write the format alone. Its loop is the plain sampler's (grpo/sampler.py) with three
additions: EOS cannot be drawn before the last section ends; a section may be restricted to some tokens;
headings are forced (they still carry the model's log-probs).
"""
from __future__ import annotations

import torch

from grpo.sampler import (Rollout, StopStrings, cache_keyword, check_sampling, draw, left_pad, make_rollout,
                          positions_from_mask)


class Scaffold:
    """Structured decoding: the model writes the body of each section, the decoder writes the headings.

    `sections` is a list of (opening, closing) strings, e.g. [("<a>", "</a>"), ("<b>", "</b>")]. The
    prompt is expected to end with the first opening. A row's current section ends when the model writes
    that section's closing string itself, or when its body reaches `budgets[i]` tokens; then the decoder
    forces the rest: the closing string if the model did not write it, and the next section's opening. The
    model's own text is never edited, only continued; `allowed` can restrict a section to some token ids
    (e.g. the digits of a rating). After the last section the row stops; EOS cannot be sampled before
    that. Forced tokens carry the model's log-probs like any other, so a rollout stays a well-defined sample
    of the model *conditioned on the headings* (for data, not for GRPO: the GRPO samplers never force a token).
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
def sample_scaffolded(model, prompts: list[list[int]], scaffold: Scaffold, *, group_size: int = 1,
                      max_new_tokens: int = 256, eos_ids: list[int] | set[int], pad_id: int,
                      temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
                      stop: StopStrings | None = None) -> Rollout:
    """`grpo.sampler.sample` under a scaffold: `group_size` completions of each prompt (token id lists)."""
    from transformers import DynamicCache

    check_sampling(temperature, greedy)
    device = next(model.parameters()).device
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)  # (E,)
    prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in range(group_size)], pad_id, device)  # (N, P)
    N = prompt_ids.shape[0]
    scaffold.reset(N)
    kw = {cache_keyword(model): DynamicCache(config=model.config), "use_cache": True, "logits_to_keep": 1}
    attention, position = prompt_mask, prompt_mask.sum(-1)  # (N, P + t), (N,)
    logits = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions_from_mask(attention),
                   **kw).logits[:, -1].float()  # (N, V)
    tokens, token_logps = [], []  # one (N,) tensor per step
    finished = torch.zeros(N, dtype=torch.bool, device=device)  # (N,)
    length = torch.full((N,), max_new_tokens, dtype=torch.long, device=device)  # (N,)
    forced: dict[int, list[int]] = {}  # row -> heading token ids still to be written for it
    for t in range(max_new_tokens):
        logits = logits.clone()  # edited in place below
        logits[:, eos] = float("-inf")  # a scaffolded row ends with its last section, never with an early EOS
        free = [r for r in (~finished).nonzero().flatten().tolist() if r not in forced]
        for row, ids in scaffold.constrained_rows(free).items():  # e.g. a rating section: digits only
            only = torch.full_like(logits[row], float("-inf"))  # (V,)
            only[ids] = 0.0
            logits[row] = logits[row] + only
        if not greedy:
            logits = logits / temperature
        logprobs = torch.log_softmax(logits, -1)  # (N, V)
        token = logits.argmax(-1) if greedy else draw(logits, generator)  # (N,)
        if forced:  # these rows take their next heading token instead of a sample
            rows = list(forced)
            token[rows] = torch.tensor([forced[r].pop(0) for r in rows], device=device)
            forced = {r: q for r, q in forced.items() if q}
        token = token.masked_fill(finished, pad_id)  # finished rows emit pad
        tokens.append(token)
        token_logps.append(logprobs.gather(-1, token[:, None]).squeeze(-1).masked_fill(finished, 0.0))  # (N,)
        written = torch.stack(tokens, 1)  # (N, t + 1)
        done = torch.zeros_like(finished)  # (N,)
        if stop is not None:
            done[stop(written, (~finished).nonzero().flatten().tolist(), t)] = True
        active = (~finished & ~done).nonzero().flatten().tolist()
        for row, ids in scaffold(written, [r for r in active if r not in forced], t).items():
            forced[row] = ids
        done[[r for r in active if scaffold.finished(r) and r not in forced]] = True
        length = length.masked_fill(done, t + 1)
        finished = finished | done
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)  # (N, P + t + 1)
        logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=position[:, None],
                       **kw).logits[:, -1].float()  # (N, V)
        position = position + 1
    return make_rollout(prompt_ids, prompt_mask, tokens, token_logps, length, finished, pad_id, group_size)
