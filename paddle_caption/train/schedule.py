"""The learning-rate schedule: warmup, then cosine / linear / constant, on training progress.

Progress is a fraction in [0, 1]: the further of steps done / total steps and time spent / the
wall-clock budget, so a time-bounded run ends on time with its learning rate fully decayed,
whatever the machine's speed.
"""
from __future__ import annotations

import math


def lr_at(cfg, progress: float) -> float:
    """Learning rate at training progress in [0, 1] for a TrainConfig `cfg`."""
    progress = min(max(progress, 0.0), 1.0)
    if cfg.warmup_ratio > 0 and progress < cfg.warmup_ratio:
        return cfg.learning_rate * progress / cfg.warmup_ratio
    rest = (progress - cfg.warmup_ratio) / max(1e-12, 1 - cfg.warmup_ratio)
    floor = cfg.min_lr_ratio
    if cfg.lr_scheduler == "constant":
        factor = 1.0
    elif cfg.lr_scheduler == "linear":
        factor = floor + (1 - floor) * (1 - rest)
    else:
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * rest))
    return cfg.learning_rate * factor
