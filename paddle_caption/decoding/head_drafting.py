"""Drafting from the model's own hidden state: Medusa heads (`HeadDrafter`) and the hybrid of heads
and retrieval (`HybridDrafter`).

The retrieval drafter (`drafting.RetrievalDrafter`) knows only the captions' text, so its drafts
stop before every word that depends on the image (a colour, a shape, a position): the training
captions continue "背景是" in many ways. Draft heads (`model/draft_heads.py`) read the hidden state
that chose the row's next token, which has seen the image, so they can draft those words.

Every drafter returns a `Draft` per row: the drafted tokens and, for each, the drafter's estimate of
the probability that it is right given the tokens before it are (heads: the head's softmax
probability; retrieval: the share of the stored continuations that go this way). Their running
product estimates the chance a draft prefix is accepted; it cuts drafts (`min_confidence`), lets
the hybrid choose between its two drafters at each position, and lets `draft_budget.DraftBudget`
decide how many draft tokens are worth feeding. Drafts decide only speed: the scheduler verifies
every token against plain greedy decoding.
"""
from __future__ import annotations

import numpy as np

from ..model.draft_heads import HeadWeights
from .drafting import Draft
from .output_head import transposed_product

DEFAULT_MIN_CONFIDENCE = 0.2


class HeadDrafter:
    """Drafts each greedy row's next tokens from its hidden state with the draft heads: head k's most
    likely token is the draft's (k+1)-th token (the row's own next token comes first, from the model).
    A draft ends where the running product of the heads' probabilities falls below
    `min_confidence`, after a stop id, or at the row's limit."""

    name = "heads"
    needs_hidden = True

    def __init__(self, heads: HeadWeights, lm_head_t: np.ndarray | None = None, stop_ids=(),
                 min_confidence: float = DEFAULT_MIN_CONFIDENCE, num_draft_tokens: int | None = None):
        if not heads.config.draft_vocab and lm_head_t is None:
            raise ValueError("full-vocabulary draft heads need the output layer's [vocab, hidden] weight")
        self.heads, self.lm_head_t = heads, lm_head_t
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.min_confidence = float(min_confidence)
        self.num_draft_tokens = min(int(num_draft_tokens or heads.config.num_heads), heads.config.num_heads)

    def head_choices(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [rows, K], probs [rows, K]): each head's most likely token and its probability."""
        tokens, probs = [], []
        heads = self.heads.features(np.asarray(hidden, dtype=np.float32), self.num_draft_tokens)
        for k, features in enumerate(heads):
            weight = self.heads.proj[k] if self.heads.proj is not None else self.lm_head_t
            logits = transposed_product(features, weight)  # [rows, N or V], the few-rows layout
            best = logits.argmax(axis=1)
            top = logits[np.arange(len(best)), best]
            # softmax probability of the top token, computed stably without a [rows, V] exp buffer copy
            probs.append(1.0 / np.exp(logits - top[:, None]).sum(axis=1))
            tokens.append(self.heads.vocab[best] if self.heads.proj is not None else best)
        return np.stack(tokens, axis=1).astype(np.int64), np.stack(probs, axis=1).astype(np.float64)

    def propose(self, rows, limits, hidden=None) -> list[Draft]:
        if hidden is None or not len(rows):
            return [Draft.empty() for _ in rows]
        tokens, probs = self.head_choices(hidden)
        return [self._draft(tokens[i], probs[i], limit) for i, limit in enumerate(limits)]

    def _draft(self, tokens: np.ndarray, probs: np.ndarray, limit: int) -> Draft:
        n, running = 0, 1.0
        while n < min(int(limit), len(tokens)):
            running *= probs[n]
            if running < self.min_confidence:
                break
            n += 1
            if int(tokens[n - 1]) in self.stop_ids:
                break
        return Draft(tokens[:n], probs[:n])


class HybridDrafter:
    """Retrieval and heads together, token by token: at each draft position the more confident of
    the two gives the token — the datastore's most frequent continuation of the text so far
    (row + draft), or head j's most likely token. The datastore then continues from the chosen
    token, whichever drafter gave it (`RetrievalDrafter.advance`): where the stored captions
    disagree (a colour, a shape, a position: the image decides) a head supplies the word, and the
    formulaic text after it ("的圆形，背景是") is drafted from the captions again. A draft ends at
    the row's limit, after a stop id, or when the running product of the chosen tokens'
    probabilities falls below `min_confidence`."""

    name = "hybrid"
    needs_hidden = True

    def __init__(self, retrieval, heads: HeadDrafter, min_confidence: float = DEFAULT_MIN_CONFIDENCE):
        self.retrieval, self.heads = retrieval, heads
        self.min_confidence = float(min_confidence)
        self.num_draft_tokens = max(retrieval.num_draft_tokens, heads.num_draft_tokens)
        self.stop_ids = heads.stop_ids

    def propose(self, rows, limits, hidden=None) -> list[Draft]:
        if hidden is None:
            return [Draft.of(d) for d in self.retrieval.propose(rows, limits)]
        head_tokens, head_probs = self.heads.head_choices(hidden)
        return [self._combine(row, head_tokens[i], head_probs[i], limit)
                for i, (row, limit) in enumerate(zip(rows, limits))]

    def _combine(self, row, head_tokens, head_probs, limit: int) -> Draft:
        retrieval = self.retrieval
        cursor = retrieval.cursor(row)
        tokens, probs, running = [], [], 1.0
        for j in range(min(int(limit), self.num_draft_tokens)):
            stored = retrieval.peek(cursor)
            head = (int(head_tokens[j]), float(head_probs[j])) if j < len(head_tokens) else None
            if stored is None and head is None:
                break
            token, prob = stored if head is None or (stored is not None and stored[1] >= head[1]) else head
            running *= prob
            if running < self.min_confidence:
                break
            tokens.append(int(token))
            probs.append(prob)
            if token in self.stop_ids:
                break
            retrieval.advance(cursor, token)
        return Draft(np.asarray(tokens, dtype=np.int64), np.asarray(probs, dtype=np.float64))
