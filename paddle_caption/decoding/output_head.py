"""A transposed copy of the output layer's weight, kept while decoding, for few-row logits.

Why: for 2-32 rows (batched decoding, speculative verification) OpenBLAS multiplies [rows, hidden]
by the [hidden, vocab] weight 3-5x slower than it multiplies a [vocab, hidden] copy by
[hidden, rows] (it handles the wide output badly). Inside `transposed_head(linear)` (decoding: the
weight cannot change there) or after `keep_transposed_head(linear)` (a model loaded for inference
only), `model.head.project` takes that route, in vocabulary blocks that stay in cache, with one
transposed copy of the weight made on first use (8-17 ms for the real vocabulary at width 64;
`bench/head.py`, docs/benchmarks.md). The copy costs the output layer's size in memory again while
it lives (39 MB for the tiny model, 2.5 GB for a float32 7B model on a CPU); on a GPU, or with
Paddle's kernels, no copy is made (`project` only asks here on its numpy path).
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..model.numpy_bridge import as_numpy

FEW_ROWS = (2, 32)  # row counts that take the transposed-weight route
_BLOCK = 8192  # vocabulary rows per block of that route
_ATTRIBUTE = "_paddle_caption_transposed_weight"


class _TransposedWeight:
    """A contiguous [vocab, hidden] copy of a Linear's weight, made on first use, and the
    `greedy_head.GreedyHead` over it (same lifetime: the weight does not change while either lives)."""

    def __init__(self, weight):
        self.weight, self.array, self.head = weight, None, None

    def get(self) -> np.ndarray:
        if self.array is None:
            self.array = np.ascontiguousarray(as_numpy(self.weight).T)
        return self.array

    def greedy(self):
        if self.head is None:
            from .greedy_head import GreedyHead

            self.head = GreedyHead(as_numpy(self.weight), self.get())
        return self.head


@contextlib.contextmanager
def transposed_head(linear):
    """Within this block `linear`'s weight does not change (decoding: eval mode, no grad), so
    `project` may keep a transposed copy of it; the copy is dropped at the end. Nests. `linear`
    None (an exported engine, whose head is inside its graphs: deploy/engine.py) keeps nothing."""
    if linear is None or getattr(linear, _ATTRIBUTE, None) is not None:
        yield
        return
    keep_transposed_head(linear)
    try:
        yield
    finally:
        setattr(linear, _ATTRIBUTE, None)


def keep_transposed_head(linear) -> None:
    """For a model that only predicts from now on (e.g. loaded by `load_predictor`): `project`
    keeps a transposed copy of `linear`'s weight for good. Never use it on a model that trains."""
    if getattr(linear, _ATTRIBUTE, None) is None:
        setattr(linear, _ATTRIBUTE, _TransposedWeight(linear.weight))


def kept_transposed_weight(linear) -> np.ndarray:
    """`linear`'s [vocab, hidden] transposed copy, the one `keep_transposed_head` keeps (made now if
    none is kept: the caller promises the weight no longer changes)."""
    keep_transposed_head(linear)
    return getattr(linear, _ATTRIBUTE).get()


def kept_greedy_head(linear):
    """The `GreedyHead` of a `linear` that keeps a transposed copy and runs its product in numpy
    (model/head.py: `use_numpy_head`), else None."""
    from ..model.head import use_numpy_head

    cache = getattr(linear, _ATTRIBUTE, None)
    return cache.greedy() if cache is not None and use_numpy_head(linear) else None


def few_rows_logits(flat: np.ndarray, linear) -> np.ndarray | None:
    """flat @ weight [rows, vocab] through the transposed copy when `linear` keeps one and the row
    count is in FEW_ROWS; None otherwise (the caller does the plain product)."""
    cache = getattr(linear, _ATTRIBUTE, None)
    if cache is None or not FEW_ROWS[0] <= len(flat) <= FEW_ROWS[1]:
        return None
    return transposed_product(flat, cache.get())


def head_product(flat: np.ndarray, weight: np.ndarray, weight_t: np.ndarray) -> np.ndarray:
    """flat [rows, hidden] @ weight [hidden, vocab]: few rows through the transposed copy `weight_t`,
    other row counts as one product (the eager head's rule, for heads held as numpy arrays)."""
    if FEW_ROWS[0] <= len(flat) <= FEW_ROWS[1]:
        return transposed_product(flat, weight_t)
    return flat @ weight


def transposed_product(flat: np.ndarray, weight_t: np.ndarray) -> np.ndarray:
    """flat [rows, hidden] @ weight_t.T -> [rows, vocab], for a [vocab, hidden] `weight_t`, in
    vocabulary blocks (also the exported engine's head for few rows: deploy/engine.py)."""
    out = np.empty((len(flat), len(weight_t)), dtype=np.float32)
    columns = np.ascontiguousarray(flat.T)
    for start in range(0, len(weight_t), _BLOCK):  # weight_t_block @ flat.T: the fast layout
        out[:, start:start + _BLOCK] = (weight_t[start:start + _BLOCK] @ columns).T
    return out
