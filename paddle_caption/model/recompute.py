"""Activation checkpointing per transformer block, with Paddle's own `recompute`.

`run_block(fn, x, *args, recompute=True)` (the caller passes `recompute=self.recompute and
self.training`) runs the block function under
`paddle.distributed.fleet.utils.recompute` (the PyLayer implementation, `use_reentrant=True`): the
forward runs without recording, only the block's inputs are kept, and the backward reruns the
forward with the RNG state of the first run (so dropout masks match) before differentiating it. A
layer's activations then live only while its own backward runs.

A block is recomputed only when its input carries a gradient — PaddleNLP's rule (`has_gradient`
in its decoders): the PyLayer's output needs a gradient-carrying input to carry one itself, so a
block fed by frozen layers (layer 16 of the "train layers 16-31" recipe, or layer 0 under LoRA,
whose input is the frozen embedding) runs normally and keeps its activations; every block after it
is recomputed. Blocks whose input needs no gradient and that have no trainable parameter record
nothing either way.

The reentrant form is chosen because it also saves the numpy CPU kernels' activations: the first
forward runs under no_grad, where `attention.py` takes its non-autograd path and keeps nothing.
"""
from __future__ import annotations

import paddle


def should_recompute(x, enabled: bool) -> bool:
    return bool(enabled) and paddle.is_grad_enabled() and not x.stop_gradient


def run_block(fn, x, *args, recompute: bool = False):
    """`fn(x, *args)`, checkpointed when `should_recompute`. `fn` must return one tensor."""
    if should_recompute(x, recompute):
        from paddle.distributed.fleet.utils import recompute as fleet_recompute

        return fleet_recompute(fn, x, *args, use_reentrant=True, preserve_rng_state=True)
    return fn(x, *args)
