"""`GreedyHead`: each row's greedy token without the whole output layer, exactly.

Why: on a CPU the output layer is the part of a decode step that grows with the tokens fed.
`hidden @ W` over the 151,936-token vocabulary reads all of W (39 MB at width 64) and writes a
0.6 MB row of logits per token: ~2 ms for one row, ~8 ms for the five rows of a speculative verify
step, ~10 ms for batch 16 (1 thread, 2026-12-03; `bench/predict.py` rows, docs/benchmarks.md). Greedy
decoding and the verification of drafts need only the argmax, and a trained model puts it among
few tokens (the demo's captions use 44), while the rows of tokens a model never emits stay near a
common centre (they all receive the same small updates: in the demo model the 44 trained rows lie
2.2-2.5 from the mean row, all others within 0.21). So the hot set starts as the rows far from the
centre (beyond `OUTLIER` x the 99th percentile of the distances), and for each row:

    hot logits   = hidden @ W[:, hot]                # the far rows, and every token chosen so far
    bound (cold) = hidden . c + |hidden| * r         # c: the mean of W's rows, r: max |W_v - c| over v not hot

since hidden . W_v = hidden . c + hidden . (W_v - c) <= hidden . c + |hidden| |W_v - c| (Cauchy-Schwarz).
When the best hot logit beats the bound by more than float32 rounding can move either, no other
token can be the argmax, and the hot argmax is the full one (ties: the lowest id, as numpy's
argmax over the full row gives, since hot ids are kept sorted). Otherwise the row takes the full
product, and its token joins the hot set: the set learns what the model emits. A model whose rows
do not cluster (random weights, and probably a real 7B model's; untested) makes rows fall back;
once `GIVE_UP` of the last `WINDOW` rows have, or the hot set passes `MAX_HOT_SHARE` of the
vocabulary, the head stops trying and computes full products only, as before.

On a GPU, or on Paddle's own head path, nothing of this runs: the full logits are one device
product there (`greedy_head_for` returns None).
"""
from __future__ import annotations

from collections import deque

import numpy as np

from .output_head import head_product

WINDOW, GIVE_UP = 1024, 512  # stop certifying once half of the last 1,024 rows needed the full product
MAX_HOT_SHARE = 1 / 8  # ... or once the hot set holds an eighth of the vocabulary
OUTLIER = 2.0  # rows farther from the centre than this x the 99th percentile distance start hot
_BLOCK = 8192  # rows of W per block when measuring distances (bounds the temporary)


class GreedyHead:
    """The argmax of `hidden @ weight` per row, certified on a few tokens where possible.

        head = GreedyHead(weight [C, V], weight_t [V, C])
        tokens = head.argmax(hidden)   # == (hidden @ weight).argmax(axis=1), up to float32 ties
        logits = head.logits(hidden)   # the full product, when a caller needs the logits

    Not thread-safe for concurrent `argmax` calls (one decoding thread owns a model's head); the hot
    set is replaced as one tuple, so a reader never sees half an update."""

    def __init__(self, weight: np.ndarray, weight_t: np.ndarray):
        self.weight, self.weight_t = weight, weight_t
        vocab, width = weight_t.shape
        self.center = weight_t.mean(axis=0, dtype=np.float64)
        center32 = self.center.astype(np.float32)
        self.distance = np.empty(vocab, np.float32)  # |W_v - c| per token
        norms = np.empty(vocab, np.float32)
        for start in range(0, vocab, _BLOCK):
            block = weight_t[start:start + _BLOCK]
            self.distance[start:start + _BLOCK] = np.linalg.norm(block - center32, axis=1)
            norms[start:start + _BLOCK] = np.linalg.norm(block, axis=1)
        self.max_norm = float(norms.max())
        # (sorted hot ids, weight[:, hot] contiguous, radius of the rest or None when nothing is left)
        self._hot = (np.zeros(0, np.int64), np.zeros((width, 0), np.float32), float(self.distance.max()))
        self._recent = deque(maxlen=WINDOW)  # 1 per row that took the full product, 0 per certified row
        self.enabled = True
        self.counts = {"certified": 0, "full": 0}
        far = np.flatnonzero(self.distance > OUTLIER * np.quantile(self.distance, 0.99))
        if len(far):  # the largest distances first, within the hot set's cap
            keep = int(MAX_HOT_SHARE * vocab) - 1
            self._learn(far[np.argsort(self.distance[far])[::-1][:keep]])

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """The full product [rows, V] (few rows through the transposed copy: output_head.py)."""
        return head_product(np.ascontiguousarray(hidden, dtype=np.float32), self.weight, self.weight_t)

    def argmax(self, hidden: np.ndarray) -> np.ndarray:
        """The greedy token of each row of `hidden` [rows, C], int64 [rows]."""
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        if not len(hidden):
            return np.zeros(0, np.int64)
        if not self.enabled:
            return self.logits(hidden).argmax(axis=1)
        ids, hot_weight, radius = self._hot
        tokens = np.zeros(len(hidden), np.int64)
        sure = np.zeros(len(hidden), bool)
        if len(ids):
            hot_logits = hidden @ hot_weight
            best = hot_logits.argmax(axis=1)
            top = hot_logits[np.arange(len(best)), best].astype(np.float64)
            if radius is None:  # every token is hot
                sure[:] = True
            else:
                exact = hidden.astype(np.float64)
                size = np.linalg.norm(exact, axis=1)
                bound = exact @ self.center + size * radius
                # float32 dot products of `width` terms are off by at most ~width * 2^-24 * |h| |W_v|
                # each; this margin is ~10x that, and still ~1e-3 logits where margins are ~10
                tolerance = 1e-5 + 1e-6 * hidden.shape[1] * size * self.max_norm
                sure = top > bound + tolerance
            tokens[sure] = ids[best[sure]]
        unsure = np.flatnonzero(~sure)
        if len(unsure):
            tokens[unsure] = self.logits(hidden[unsure]).argmax(axis=1)
            self._learn(tokens[unsure])
        self._count(len(hidden) - len(unsure), len(unsure))
        return tokens

    def _learn(self, tokens: np.ndarray) -> None:
        ids = np.union1d(self._hot[0], tokens).astype(np.int64)
        if len(ids) == len(self._hot[0]):
            return
        cold = np.ones(len(self.distance), bool)
        cold[ids] = False
        radius = float(self.distance[cold].max()) if cold.any() else None
        self._hot = (ids, np.ascontiguousarray(self.weight[:, ids]), radius)
        if len(ids) > MAX_HOT_SHARE * len(self.distance):
            self.enabled = False

    def _count(self, certified: int, full: int) -> None:
        self.counts["certified"] += certified
        self.counts["full"] += full
        self._recent.extend([0] * min(certified, WINDOW))
        self._recent.extend([1] * min(full, WINDOW))
        if len(self._recent) == WINDOW and sum(self._recent) >= GIVE_UP:
            self.enabled = False

    def summary(self) -> dict:
        return {**self.counts, "hot_tokens": len(self._hot[0]), "enabled": self.enabled}


def greedy_head_for(model) -> GreedyHead | None:
    """The model's `GreedyHead` when its output layer runs in numpy on this CPU with a kept
    transposed copy (inside `output_head.transposed_head`, after `keep_transposed_head`, or an
    exported engine's head), else None: then decoding takes full logits from the model."""
    linear = getattr(model, "lm_head", None)
    if linear is None:  # an exported engine: its head is numpy (deploy/engine.py)
        head = getattr(model, "head", None)
        return head.greedy() if head is not None and hasattr(head, "greedy") else None
    from .output_head import kept_greedy_head

    return kept_greedy_head(linear)
