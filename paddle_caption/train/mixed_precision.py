"""Training precision: float32, or Paddle's O2 in bfloat16/float16 with float32 master weights.

`TrainConfig.dtype` is the model's dtype, and a bfloat16/float16 run follows Paddle's pure
low-precision recipe as PaddleNLP's Trainer runs it (`fp16_opt_level="O2"`):

- The model is built or loaded directly in `dtype` (`model_init.initial_model`), every parameter;
  frozen parameters stay in it. LoRA adapters are created in it too (PaddleNLP's `LoRAConfig.dtype`).
- AdamW is created with `multi_precision=True`: for every trainable low-precision parameter it
  keeps a float32 master copy (made with the moments, at the first step), updates the copy and
  writes it back rounded to `dtype`; the moments are float32. Frozen parameters are not in the
  optimizer and get no copy. Gradients stay in the parameter dtype (Paddle's O2 default, PaddleNLP's
  `amp_master_grad=False`), also while they accumulate over micro-steps.
- `paddle.amp.decorate(model, optimizer, level="O2", dtype=...)` does Paddle's O2 bookkeeping: it
  casts parameters still in float32 to `dtype` (none are left) and sets the optimizer's
  multi_precision. It runs before the parallel wrappers, as in PaddleNLP.
- The forward runs under `paddle.amp.auto_cast(level="O2", dtype=...)` with the embedding lookup
  kept in the low dtype (PaddleNLP's `custom_white_list` of lookup_table); the model's float32 steps
  (RMSNorm, attention softmax, loss) leave autocast (`model.precision.float32_compute`).
- float16 only: a dynamic `paddle.amp.GradScaler` (Paddle's defaults: initial scale 2^15) scales the
  loss, unscales the gradients before they are clipped, skips a step whose gradients overflowed and
  adapts its scale; its state is saved in every checkpoint (`checkpoints.SCALER_STATE`) and restored
  on resume. bfloat16 has float32's exponent range and needs none (PaddleNLP scales float16 only).
  Under several processes the scaler is wrapped by the parallel engine (`parallel.distributed_scaler`)
  so all ranks agree on an overflow.

On a CPU Paddle has no bfloat16/float16 matmul and `decorate`, `auto_cast` and `GradScaler` are
documented no-ops (they warn and return what they were given), so `require_device` refuses a
low-precision config there in one line before anything loads. What a CPU can still check (the
model built in bfloat16, the master weights for exactly the trainable parameters, checkpoints of
all of it bit for bit, the scaler's state) is in tests/test_mixed_precision.py.
"""
from __future__ import annotations

import contextlib

from ..model.precision import dtype_name, require_compute

# PaddleNLP's O2 autocast lists: the embedding lookup (black-listed by Paddle's O2 defaults) stays in
# the low dtype instead of producing float32 embeddings.
O2_WHITE_LIST = frozenset({"lookup_table", "lookup_table_v2"})


class MixedPrecision:
    """The precision side of a training step: optimizer options, decoration, autocast, loss scaling."""

    def __init__(self, dtype: str):
        self.dtype = dtype_name(dtype)
        self.low = self.dtype != "float32"
        self.scaler = None  # float16 only, made by `decorate`

    def require_device(self) -> None:
        """One line, before anything loads, when this device cannot compute in the dtype (CPU)."""
        require_compute(self.dtype, "config dtype")

    def optimizer_options(self) -> dict:
        """Keyword arguments for the optimizer: float32 master weights for low-precision parameters."""
        return {"multi_precision": self.low}

    def decorate(self, model, optimizer):
        """Paddle's O2 set-up of the (unwrapped) model and optimizer; returns the optimizer. For
        float16 it also makes the GradScaler."""
        if not self.low:
            return optimizer
        import paddle

        _, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level="O2", dtype=self.dtype)
        if self.dtype == "float16":
            self.scaler = paddle.amp.GradScaler()
        return optimizer

    def autocast(self):
        """The context a training forward runs in."""
        if not self.low:
            return contextlib.nullcontext()
        import paddle

        return paddle.amp.auto_cast(enable=True, level="O2", dtype=self.dtype,
                                    custom_white_list=set(O2_WHITE_LIST))

    def backward(self, loss) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer) -> None:
        """The optimizer step; with a scaler: unscale, skip on overflow, update the scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def loss_scale(self) -> float | None:
        """The current loss scale (float16), for the log."""
        if self.scaler is None or not self.scaler.is_enable():
            return None
        return float(self.scaler.state_dict()["scale"][0])
