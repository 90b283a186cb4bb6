"""Data parallel and optimizer-state sharding for the trainer, with Paddle's own engines, and the
few decisions all ranks must share.

Launch: `python -m paddle.distributed.launch --nproc_per_node N supervised_finetune.py CONFIG`
(`--gpus 0,1,...` on GPUs; gloo on CPU). Each rank trains on its share of every step's batches
(`data.dataset.RankBatchSampler`) and the gradients are averaged over the ranks:

- `sharding: "none"`: `paddle.DataParallel` (which broadcasts rank 0's weights when it wraps), every
  micro-step under `no_sync`, and one fused all-reduce of the trainable gradients, averaged over the
  ranks, after the step's last backward (`reduce_gradients`: Paddle's
  `fused_allreduce_gradients`, gradients coalesced into 128 MB buckets). Every rank holds the whole
  optimizer state.
- `sharding: "stage1"`: fleet's `DygraphShardingOptimizer` (`fleet.init` with `sharding_degree` =
  ranks, `fleet.distributed_model` / `distributed_optimizer`). Each rank keeps the AdamW moments
  (and master weights) of its share of the parameters only; at `optimizer.step()` gradients are
  reduced to each parameter's owner, the owner updates it and broadcasts the new values. Nothing
  is communicated on accumulation micro-steps. Runs on CPU/gloo (tested with 2 processes).
- `sharding: "stage2"`: `paddle.distributed.sharding.group_sharded_parallel(level="os_g")` shards
  gradients too. Paddle 3.3 supports it only on GPU/XPU: on CPU it stops with `AssertionError:
  group_sharded_parallel only support gpu, xpu and custom_device now`, so the trainer refuses it
  on CPU up front (`check_sharding`) and the path is not exercised by the CPU test suite. Its
  GroupShardedStage2 reduces gradients in every backward and has no `no_sync`, so with gradient
  accumulation it communicates on every micro-step: A times the gradient traffic of stage1 at
  accumulation A (correct, just heavier). The 7B recipes use stage1 or none.

With sharding, each rank's optimizer state is its own file in the checkpoint
(`checkpoints.optimizer_shard_name`); a sharded run resumes with the same number of ranks.

Why the gradients are not all-reduced by DataParallel's reducer, during the backward: the reducer
finds the parameters a step uses by walking the autograd graph back from the forward's outputs, once
at the first step, and marks the others ready at once. Recompute (`model/recompute.py`) runs each
block's forward under no_grad inside a PyLayer, so the walk stops at the PyLayer and every parameter
inside a recomputed block looks unused: it is marked ready (with a zero gradient) and dies when its
real gradient arrives in the recomputed backward: `parameter[16][linear_14.w_0] has been ready
before` in `GradNodePyLayer_RecomputeFunction`. `find_unused_parameters=True` does not help (the
walk still cannot see through the PyLayer), and Paddle's DataParallel documentation states that
PyLayer is unsupported and recommends `no_sync` plus a manual all-reduce, which is what PaddleNLP's
Trainer does whenever recompute and data parallel meet. All 7B recipes recompute, so the kit takes
that one path for every data-parallel run, with or without recompute: one code path, tested in
every combination (tests/test_recipes_launched.py). The cost is the overlap of communication with
the backward that the reducer gives: not measured here (two CPU ranks over gloo say nothing about
NCCL on GPUs); PaddleNLP accepts the same cost whenever it recomputes.

The model is wrapped in `LossOnly` so that the parallel engines see a forward that returns the loss
tensor, whatever the model returns (a `CausalLMOutput` dataclass, which neither engine looks into).

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


STAGE2_ON_CPU = ("sharding stage2 needs GPUs: Paddle's group_sharded_parallel refuses this device "
                 "(AssertionError: group_sharded_parallel only support gpu, xpu and custom_device now); "
                 "use sharding stage1, which runs on CPU too, or none")


def is_sharded(world: int, sharding: str) -> bool:
    return world > 1 and sharding != "none"


def check_sharding(world: int, sharding: str) -> str | None:
    """Refuse a sharding Paddle cannot run here; returns a note to log, if any."""
    if sharding == "none":
        return None
    if world == 1:
        return f"sharding {sharding} needs several processes (paddle.distributed.launch): training unsharded"
    if sharding == "stage2" and paddle.get_device().split(":")[0] not in ("gpu", "xpu"):
        raise UserError(STAGE2_ON_CPU)
    return None


def init_processes(world: int, sharding: str) -> None:
    """Join the launched job's process group (fleet's hybrid topology for stage-1 sharding)."""
    if world == 1:
        return
    if sharding == "stage1":
        from paddle.distributed import fleet

        strategy = fleet.DistributedStrategy()
        strategy.hybrid_configs = {"dp_degree": 1, "mp_degree": 1, "pp_degree": 1, "sharding_degree": world}
        fleet.init(is_collective=True, strategy=strategy)
    else:
        paddle.distributed.init_parallel_env()


def wrap_for_training(model, optimizer, world: int, sharding: str = "none"):
    """(the layer a training step calls, the optimizer to step): the loss module and the optimizer,
    wrapped by the config's parallel engine when world > 1. Wrapping broadcasts rank 0's weights."""
    loss_module = LossOnly(model)
    if world == 1:
        return loss_module, optimizer
    if sharding == "stage1":
        from paddle.distributed import fleet

        return fleet.distributed_model(loss_module), fleet.distributed_optimizer(optimizer)
    if sharding == "stage2":
        from paddle.distributed.sharding import group_sharded_parallel

        module, optimizer, _ = group_sharded_parallel(loss_module, optimizer, level="os_g")
        return module, optimizer
    return paddle.DataParallel(loss_module), optimizer


def distributed_scaler(scaler, world: int, sharding: str = "none"):
    """The float16 GradScaler as the parallel engine needs it (PaddleNLP's choices): under plain data
    parallel every rank unscales the same all-reduced gradients and reaches the same overflow
    decision alone; a sharded optimizer holds only its share, so fleet's `distributed_scaler`
    (stage1) or `GroupShardedScaler` (stage2) all-reduces the overflow flag."""
    if scaler is None or world == 1 or sharding == "none":
        return scaler
    if sharding == "stage1":
        from paddle.distributed import fleet

        return fleet.distributed_scaler(scaler)
    from paddle.distributed.fleet.meta_parallel.sharding.group_sharded_utils import GroupShardedScaler

    return GroupShardedScaler(scaler)


def barrier(world: int) -> None:
    if world > 1:
        paddle.distributed.barrier()


def micro_step(train_module):
    """The context of one micro-step's forward and backward. Under DataParallel: `no_sync`, always
    (the reducer cannot follow recompute: module docstring); gradients accumulate locally until
    `reduce_gradients`. Sharded engines communicate at `optimizer.step()` and need nothing here."""
    if not isinstance(train_module, paddle.DataParallel):
        return contextlib.nullcontext()
    return train_module.no_sync()


def reduce_gradients(train_module, params) -> None:
    """After a step's last backward, before the optimizer step: average the trainable gradients
    over the ranks under DataParallel, in one fused all-reduce per 128 MB bucket (Paddle's
    `fused_allreduce_gradients`, as PaddleNLP's Trainer). Every rank must hold a gradient for the
    same parameters (a parameter unused on some ranks only would desynchronise the buckets), so a
    missing gradient is refused by name rather than left to hang."""
    if not isinstance(train_module, paddle.DataParallel):
        return
    from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients

    params = list(params)
    missing = np.asarray([int(p.grad is None) for p in params], dtype=np.int64)
    counts = paddle.to_tensor(missing)
    paddle.distributed.all_reduce(counts)
    partial = [p.name for p, n in zip(params, counts.numpy()) if 0 < n < paddle.distributed.get_world_size()]
    if partial:
        raise RuntimeError(f"parameter {partial[0]} has a gradient on some ranks only: data parallel "
                           "needs every rank to use the same parameters in a step")
    fused_allreduce_gradients(params, None)


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
