"""Logits processing for decoding, in NumPy on each row's last position only: the repetition
penalty, log-softmax and temperature / top-k / top-p sampling."""
from __future__ import annotations

import numpy as np

from .config import GenerationConfig


def apply_repetition_penalty(logits: np.ndarray, seen: list[np.ndarray], penalty: float):
    """CTRL-style: divide positive / multiply negative logits of every id already in the context."""
    if penalty == 1.0:
        return logits
    for row, ids in enumerate(seen):
        values = logits[row, ids]
        logits[row, ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample_tokens(logits: np.ndarray, cfg: GenerationConfig, rng) -> np.ndarray:
    """One sampled id per row. `rng` is one Generator (rows draw from it in order) or one per row."""
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = np.partition(logits, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(log_softmax(logits))
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= cfg.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    rngs = rng if isinstance(rng, (list, tuple)) else [rng] * len(probs)
    return np.array([r.choice(len(p), p=p) for r, p in zip(rngs, probs)], dtype=np.int64)
