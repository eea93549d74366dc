"""Copy rate: how many answers reuse someone else's reasoning text (pure functions of strings).

A model that writes the same text for every user, or recites the prompt's format demonstration, is not
reasoning about the user, whatever its rating error. Definitions (used by `experiments.evaluate`):

- reasoning: the model's whole answer (the prefilled text + the completion) with the rating block
  `<rate> ... </rate>` removed and every remaining tag (`<analyze user>`, `</match>`, `<think>` ...) removed,
  so only the words the model wrote between the tags count: tag names are shared by every well-formed answer
  and would make two unrelated answers look alike. A demonstration is reduced the same way.
- words: the lower-cased `\\w+` tokens of the reasoning (`re.findall(r"\\w+", text.lower())`).
- 6-grams: the *set* of runs of 6 consecutive words. An answer with fewer than 6 words has none: it is never
  counted as copying (its share is 0).
- share of answer A in another text B: |6-grams of A that also occur in B| / |6-grams of A| (not symmetric:
  a short answer pasted inside a long one has share 1, the long one a small share).
- B ranges over every *other* answer of the same evaluation and every demonstration in the prompt (the
  one-shot example's answer, when the template shows one), each separately; the answer's copy share is the
  largest of these shares, and the answer is *copied* when that share is > 0.30 (strictly more than 30%).
- copy rate: copied answers / all answers (answers without 6-grams count in the denominator, as not copied).
- copy rate among unrelated answers (`related`): the same, where B ranges only over answers about another
  user and another item (and the demonstrations). A model that reasons from the data says the same true
  things about an item each time it meets it; the test splits meet most items and users more than once
  (Amazon music: 367 rows, 205 items, 181 users), so the first rate counts those as copies and this one
  does not.

Efficient: one dict from 6-gram to the ids of the texts that contain it; for each answer the overlaps with all
other texts at once are a `np.bincount` of the ids found under its 6-grams, so the work grows with the number
of shared 6-grams, not with answers x answers x words.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

N = 6
THRESHOLD = 0.30
_WORD = re.compile(r"\w+")
_RATE_BLOCK = re.compile(r"<\s*rate\s*>.*?(<\s*/\s*rate\s*>|$)", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"<\s*/?\s*[A-Za-z][A-Za-z _-]{0,40}>")


def reasoning_text(answer: str) -> str:
    """The answer without its rating block and without tag markup (the words between tags stay)."""
    return _TAG.sub(" ", _RATE_BLOCK.sub(" ", answer))


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int = N) -> set[str]:
    """The set of word n-grams of a text (each joined by one space); empty when it has fewer than n words."""
    w = words(text)
    return {" ".join(w[k:k + n]) for k in range(len(w) - n + 1)}


def subjects(example: dict) -> tuple[str, str]:
    """The labels `related` takes for an answer about `example`: its user and its item."""
    return f"user:{example.get('user_id')}", f"item:{example.get('item_id')}"


def copy_shares(answers: Sequence[str], demonstrations: Sequence[str] = (), n: int = N,
                related: Sequence[Iterable[str]] | None = None) -> list[tuple[float, str | None]]:
    """Per answer: (largest share of its n-grams found in one other text, that text) where the text is
    "answer <j>" (another answer, 0-based) or "demonstration <k>"; (0.0, None) when it shares nothing or has
    no n-grams. The texts are compared as given: pass `reasoning_text(...)` of answers to follow the module's
    definition. `related`: per answer, labels (e.g. "user:<id>", "item:<id>"); two answers with a label in
    common are not compared (answers about the same item may rightly say the same things about it)."""
    grams = [ngrams(a, n) for a in answers]
    demo_grams = [ngrams(d, n) for d in demonstrations]
    n_answers = len(grams)
    index: dict[str, list[int]] = {}
    for doc, gs in enumerate(grams + demo_grams):
        for g in gs:
            index.setdefault(g, []).append(doc)
    postings = {g: np.asarray(ids, dtype=np.int64) for g, ids in index.items() if len(ids) > 1}
    total = n_answers + len(demo_grams)
    by_label: dict[str, list[int]] = {}  # label -> the answers that carry it
    for doc, labels in enumerate(related or []):
        for label in labels:
            by_label.setdefault(label, []).append(doc)
    out = []
    for i, gs in enumerate(grams):
        found = [postings[g] for g in gs if g in postings]
        if not gs or not found:
            out.append((0.0, None))
            continue
        counts = np.bincount(np.concatenate(found), minlength=total)
        counts[i] = 0  # not itself
        if related is not None:
            counts[[j for label in related[i] for j in by_label[label]]] = 0
        j = int(np.argmax(counts))
        if counts[j] == 0:
            out.append((0.0, None))
            continue
        source = f"answer {j}" if j < n_answers else f"demonstration {j - n_answers}"
        out.append((float(counts[j]) / len(gs), source))
    return out


def copy_rate(answers: Sequence[str], demonstrations: Sequence[str] = (), n: int = N,
              threshold: float = THRESHOLD, related: Sequence[Iterable[str]] | None = None) -> dict:
    """The copy rate of model answers (the module's definition: reasoning text, n-grams, share > threshold).

    Returns {"copy_rate", "copied" (count), "with_ngrams" (answers long enough to be compared), "shares"
    (per answer), "sources" (per answer: the text it shares most with, or None), "copied_flags"}."""
    texts = [reasoning_text(a) for a in answers]
    demos = [reasoning_text(d) for d in demonstrations]
    result = copy_shares(texts, demos, n, related)
    shares = [s for s, _ in result]
    flags = [s > threshold for s in shares]
    with_ngrams = sum(1 for t in texts if len(words(t)) >= n)
    return {"copy_rate": float(np.mean(flags)) if flags else float("nan"), "copied": int(sum(flags)),
            "with_ngrams": with_ngrams, "shares": shares, "sources": [src for _, src in result],
            "copied_flags": flags}
