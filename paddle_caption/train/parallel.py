"""Data parallel for the trainer, with Paddle's own engine (`paddle.DataParallel`), and the few
decisions all ranks must share.

Launch: `python -m paddle.distributed.launch --nproc_per_node N supervised_finetune.py CONFIG`
(`--gpus 0,1,...` on GPUs; gloo on CPU). Each rank trains on its share of every step's batches
(`data.dataset.RankBatchSampler`); DataParallel averages the gradients over the ranks.

Why the model is wrapped in `LossOnly`: DataParallel finds the unused parameters of a step by
walking the autograd graph back from the tensors its wrapped forward returns, and it looks for
them only in Tensors, lists, tuples and dicts. The model returns a `CausalLMOutput` dataclass, so
wrapped directly the reducer found no output, took *every* parameter for unused, marked them all
ready (with zero gradients) when the first gradient arrived, and died when that parameter's real
gradient was marked ready again: `parameter[18][linear_15.w_0] has been ready before` (that is
lm_head, the first gradient of the backward). `find_unused_parameters=True`, which the message
suggests, does not help (the walk still starts from nothing). Returning the loss tensor lets the
reducer trace the real graph; the numpy PyLayer ops (model/head.py, model/attention.py) are ordinary
graph nodes with edges to their inputs, and parameters used twice are summed before their
accumulation hook fires, so the default (`find_unused_parameters=False`, one walk at the first
step) is right: a parameter unused at the first step (e.g. the vision tower under
`ablate_images`) stays unused.

Time-based decisions (the learning rate on a wall-clock schedule, the stop when the budget is
spent) follow rank 0's clock: `agree` hands every rank rank 0's values in the same collective that
sums the step's loss, once per optimiser step.
"""
from __future__ import annotations

import contextlib

import numpy as np
import paddle

from ..runtime import UserError


class LossOnly(paddle.nn.Layer):
    """The model with its training loss as the forward's only output (see the module docstring)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, images=None, attention_mask=None, labels=None):
        return self.model(input_ids, images=images, attention_mask=attention_mask, labels=labels).loss


def wrap_for_training(model, world: int):
    """The layer a training step calls: the loss module, inside DataParallel when world > 1."""
    loss_module = LossOnly(model)
    return paddle.DataParallel(loss_module) if world > 1 else loss_module


def gradient_sync(train_module, sync: bool):
    """A context for one micro-step's forward and backward: under DataParallel, gradients are
    all-reduced only when `sync` (the step's last micro-batch); the others accumulate locally
    (`no_sync`), so an accumulation of A micro-batches costs one all-reduce, not A."""
    if sync or not isinstance(train_module, paddle.DataParallel):
        return contextlib.nullcontext()
    return train_module.no_sync()


def agree(world: int, rank0_values: list[float], summed_values: list[float]) -> tuple[list[float], list[float]]:
    """(rank 0's `rank0_values`, the sum over ranks of `summed_values`) on every rank, in one
    all-reduce. With one process, the values themselves."""
    if world == 1:
        return list(rank0_values), list(summed_values)
    rank = paddle.distributed.get_rank()
    mine = np.asarray([*(rank0_values if rank == 0 else [0.0] * len(rank0_values)), *summed_values],
                      dtype=np.float64)
    tensor = paddle.to_tensor(mine)
    paddle.distributed.all_reduce(tensor)
    values = tensor.numpy().tolist()
    return values[:len(rank0_values)], values[len(rank0_values):]


def check_same_on_all_ranks(world: int, value: int, what: str) -> None:
    """Refuse to train when ranks disagree on `value` (e.g. the step they resumed from)."""
    if world == 1:
        return
    tensor = paddle.to_tensor(np.asarray([value, -value], dtype=np.int64))
    paddle.distributed.all_reduce(tensor, op=paddle.distributed.ReduceOp.MAX)
    high, low = int(tensor[0]), -int(tensor[1])
    if high != low:
        raise UserError(f"ranks disagree on {what} ({low} vs {high}): every rank must see the same "
                        "output_dir (on several machines, a shared filesystem)")


def check_replicas_agree(world: int, named_params: list[tuple[str, object]]) -> None:
    """Fail loudly if data-parallel replicas hold different trained weights.

    Every rank applies the same averaged gradients with the same learning rate, so the replicas
    stay bit-identical; any rank-local decision in the step (a learning rate from a rank's own
    clock, a skipped micro-batch) breaks that silently. One all-reduce of per-parameter sums at the
    end of training checks it."""
    if world == 1:
        return
    sums = np.asarray([float(np.asarray(p.numpy(), dtype=np.float64).sum()) for _, p in named_params])
    tensor = paddle.to_tensor(np.concatenate([sums, -sums]))
    paddle.distributed.all_reduce(tensor, op=paddle.distributed.ReduceOp.MAX)
    high, low = np.split(tensor.numpy(), 2)
    differ = [name for (name, _), a, b in zip(named_params, high, -low) if a != b]
    if differ:
        raise RuntimeError(f"data-parallel replicas diverged in {len(differ)} parameter(s), e.g. "
                           f"{differ[0]}: the ranks did not apply the same updates")
