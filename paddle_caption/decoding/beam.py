"""Beam search for one prompt, one decode step at a time (`BeamSearch`).

The scheduler (`scheduler.ContinuousBatch`) gives a beam request `num_beams` cache rows; each step
it hands this object those rows' next-token logits and gets back which rows continue (parents,
possibly repeated) and the token each is fed, and reorders the cache with `DecodeBatch.keep`. So
beam requests share a batch with greedy and sampling rows, joining and leaving at step boundaries.

Ranking: a hypothesis that emits a stop id is finished with score sum log-prob / length **
length_penalty; the search ends when `num_beams` hypotheses are finished or after max_new_tokens
steps, and then the unfinished beams compete too. The result is the best hypothesis, or the
`num_return_sequences` best.
"""
from __future__ import annotations

import numpy as np

from .config import GenerationConfig
from .logits import apply_repetition_penalty, log_softmax


class BeamSearch:
    def __init__(self, prompt: list[int], cfg: GenerationConfig):
        self.cfg, self.width = cfg, cfg.num_beams
        self.scores = np.zeros(self.width, dtype=np.float64)
        self.scores[1:] = -np.inf  # all beams start identical: expand only the first
        self.tokens: list[list[int]] = [[] for _ in range(self.width)]
        self.finished: list[tuple[float, list[int]]] = []  # (normalised score, tokens)
        self.seen_base = np.unique(np.asarray(prompt, dtype=np.int64))
        self.steps = 0
        self.done = False  # enough hypotheses finished

    def advance(self, logits: np.ndarray) -> tuple[list[int], list[int]] | None:
        """One step from the beams' next-token logits [num_beams, vocab] (edited in place by the
        repetition penalty): (parent beam of each new beam, the token it is fed), or None when the
        search has ended (`results` then holds the answer)."""
        cfg, beams = self.cfg, self.width
        seen = [np.union1d(self.seen_base, np.asarray(tokens, dtype=np.int64)) for tokens in self.tokens]
        logp = log_softmax(apply_repetition_penalty(logits, seen, cfg.repetition_penalty))
        vocab = logp.shape[-1]
        total = (self.scores[:, None] + logp).reshape(1, -1)
        top = np.argpartition(-total, 2 * beams, axis=-1)[0, : 2 * beams]
        total = total[0]
        new_scores, new_tokens, new_parents = [], [], []
        for flat in top[np.argsort(-total[top])]:
            parent, token = divmod(int(flat), vocab)
            value = total[flat]
            if not np.isfinite(value):
                continue
            if token in cfg.stop_ids:
                length = len(self.tokens[parent]) + 1
                self.finished.append((value / length ** cfg.length_penalty, self.tokens[parent]))
                continue
            new_scores.append(value)
            new_tokens.append(token)
            new_parents.append(parent)
            if len(new_scores) == beams:
                break
        self.done = self.done or len(self.finished) >= beams
        while len(new_scores) < beams:  # keep the row count fixed; dead beams score -inf
            new_scores.append(-np.inf)
            new_tokens.append(cfg.pad_id)
            new_parents.append(0)
        self.scores = np.asarray(new_scores, dtype=np.float64)
        self.tokens = [self.tokens[p] + [t] for p, t in zip(new_parents, new_tokens)]
        self.steps += 1
        if self.done or self.steps >= cfg.max_new_tokens:
            return None
        return new_parents, new_tokens

    def results(self) -> list[list[int]]:
        """The `num_return_sequences` best hypotheses, best first ([] fills missing ones)."""
        cfg, pool = self.cfg, list(self.finished)
        if not self.done:  # unfinished beams compete too
            for score, tokens in zip(self.scores, self.tokens):
                if np.isfinite(score):
                    pool.append((score / max(len(tokens), 1) ** cfg.length_penalty, tokens))
        ranked = sorted(pool, key=lambda item: -item[0])[:cfg.num_return_sequences]
        ranked += [(0.0, [])] * (cfg.num_return_sequences - len(ranked))
        return [list(tokens) for _, tokens in ranked]
