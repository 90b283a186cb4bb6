"""Data parallel and optimizer-state sharding for the trainer, with Paddle's own engines, and the
few decisions all ranks must share.

Launch: `python -m paddle.distributed.launch --nproc_per_node N supervised_finetune.py CONFIG`
(`--gpus 0,1,...` on GPUs; gloo on CPU). Each rank trains on its share of every step's batches
(`data.dataset.RankBatchSampler`) and the gradients are averaged over the ranks:

- `sharding: "none"`: `paddle.DataParallel` all-reduces gradients during the backward of a step's
  last micro-batch (`no_sync` on the others). Every rank holds the whole optimizer state.
- `sharding: "stage1"`: fleet's `DygraphShardingOptimizer` (`fleet.init` with `sharding_degree` =
  ranks, `fleet.distributed_model` / `distributed_optimizer`). Each rank keeps the AdamW moments
  (and master weights) of its share of the parameters only; at `optimizer.step()` gradients are
  reduced to each parameter's owner, the owner updates it and broadcasts the new values. Nothing
  is communicated on accumulation micro-steps. Runs on CPU/gloo (tested with 2 processes).
- `sharding: "stage2"`: `paddle.distributed.sharding.group_sharded_parallel(level="os_g")` shards
  gradients too. Paddle 3.3 supports it only on GPU/XPU: on CPU it stops with `AssertionError:
  group_sharded_parallel only support gpu, xpu and custom_device now`, so the trainer refuses it
  on CPU up front (`check_sharding`) and the path is not exercised by the CPU test suite. Its
  GroupShardedStage2 reduces gradients in every backward (it has no `no_sync`), so with gradient
  accumulation it communicates on every micro-step.

With sharding, each rank's optimizer state is its own file in the checkpoint
(`checkpoints.optimizer_shard_name`); a sharded run resumes with the same number of ranks.

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
