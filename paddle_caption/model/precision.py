"""Precision as a setting of the model: which dtypes exist, building in one, and where it can compute.

A model is built directly in its dtype — `default_dtype("bfloat16")` makes every parameter Paddle
creates inside it bfloat16, and `paddle.LazyGuard` (see `MgenVLForCausalLM.from_config`) defers the
allocation until a checkpoint fills it — so a 9.6B model never exists in float32 first (38 GB).

Which parameters stay float32: none. PaddleNLP's `QWenRMSNorm` creates its weight in the default
dtype and PaddleMIX's Qwen-VL builds its LayerNorms and `visual.proj` the same way; neither declares
`_keep_in_fp32_modules`. Paddle's O2 (`paddle.amp.decorate(level="O2")`) agrees for bfloat16 (it
keeps only BatchNorm in float32); for float16 it would also keep `nn.LayerNorm` in float32, which
the trainer can still ask for with `decorate`. Numerically sensitive steps compute in float32
whatever the storage dtype, as upstream does: RMSNorm normalises in float32, the attention softmax
runs in float32, the position-table interpolation and the loss are float32.

Training in bfloat16/float16 is Paddle's O2 (train/mixed_precision.py): `paddle.amp.auto_cast(level=
"O2")` runs every op in the low dtype except a short black list, which would also pull the model's
float32 steps down. Those steps therefore leave autocast inside `float32_compute()`, as PaddleNLP's
Llama does for its RMSNorm, attention softmax and loss (`paddle.amp.auto_cast(False)`).

Paddle's CPU build stores bfloat16/float16 tensors but has no bfloat16 matmul (the kernel is "not
registered"), so a low-precision forward on CPU is refused with one line naming the fix
(`check_compute_dtype`) instead of a kernel traceback deep inside a layer; commands that take a
dtype refuse it up front (`require_compute`), before anything heavy loads.
"""
from __future__ import annotations

import contextlib

from ..runtime import UserError

# No module-level `import paddle`: TrainConfig validation reads DTYPES without loading Paddle.

DTYPES = ("float32", "bfloat16", "float16")
BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}
# Short names upstream configs use (PaddleNLP `dtype`, HF `torch_dtype`, the trainer's old precision).
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32",
            "half": "float16"}


def dtype_name(dtype) -> str:
    """'float32' | 'bfloat16' | 'float16' for a paddle dtype, a numpy dtype or a name; else UserError."""
    name = str(dtype).replace("paddle.", "").lower()
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return name


@contextlib.contextmanager
def default_dtype(dtype):
    """Parameters created inside are `dtype`; the previous default is restored on exit, even on error."""
    import paddle

    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype_name(dtype))
    try:
        yield
    finally:
        paddle.set_default_dtype(previous)


def can_compute(dtype) -> bool:
    """Whether the current device has matmul kernels for `dtype` (CPU: float32 only)."""
    import paddle

    on_cpu = paddle.framework._current_expected_place().is_cpu_place()
    return dtype_name(dtype) == "float32" or not on_cpu


def default_load_dtype(stored) -> str:
    """The dtype a checkpoint stored in `stored` loads as when the caller names none: as stored
    where that can compute (a GPU), float32 on a CPU."""
    return dtype_name(stored) if can_compute(stored) else "float32"


def require_compute(dtype, what: str) -> None:
    """Refuse, in one line and before anything loads, a `dtype` this device cannot compute in
    (`what` names the setting, e.g. "config dtype" or "--dtype")."""
    name = dtype_name(dtype)
    if not can_compute(name):
        raise UserError(f"{what} {name}: Paddle's CPU build has no bfloat16/float16 matmul, so {name} "
                        "needs a GPU; on CPU use float32")


def float32_compute():
    """A context for a step the model computes in float32 whatever its dtype: under O2 autocast it
    leaves autocast (which would run the step in the low dtype), elsewhere it does nothing."""
    import paddle

    if paddle.amp.is_autocast_enabled():
        return paddle.amp.auto_cast(False)
    return contextlib.nullcontext()


def check_compute_dtype(tensor) -> None:
    """Refuse low-precision arithmetic on CPU with the fix, before Paddle fails inside a kernel."""
    import paddle

    if tensor.place.is_cpu_place() and tensor.dtype in (paddle.bfloat16, paddle.float16):
        raise UserError(f"{dtype_name(tensor.dtype)} compute is not supported on CPU (Paddle's CPU build "
                        "has no bfloat16/float16 matmul): load the model with dtype float32 on CPU "
                        "(e.g. from_pretrained(path, dtype='float32')), or run on a GPU")
