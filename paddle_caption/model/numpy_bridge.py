"""Zero-copy crossings between Paddle CPU tensors and numpy, and when the numpy kernels apply.

The output layer (`head.py`) and the attention core and RoPE (`attention.py`) run in numpy on CPU
because Paddle's CPU kernels for those shapes are several times slower (docs/benchmarks.md). Both
decide with `numpy_capable` and cross through DLPack without copying: `tensor.numpy()` would copy
the 39 MB [hidden x vocab] head weight on every call, which cost as much as the product itself.

One switch turns the numpy kernels off, so the kernels a GPU runs (Paddle's attention, RoPE and
head expressions) run — and are tested — on CPU too: the environment variable
`PADDLE_CAPTION_KERNELS=paddle`, or `with paddle_kernels():` in code (tests use the latter).
"""
from __future__ import annotations

import contextlib
import ctypes
import os

import numpy as np
import paddle

from ..runtime import UserError

KERNELS_ENV = "PADDLE_CAPTION_KERNELS"
_KERNEL_CHOICES = ("numpy", "paddle")
_forced_paddle = 0  # depth of active `paddle_kernels()` blocks


def numpy_kernels_enabled() -> bool:
    """False inside `paddle_kernels()` or with PADDLE_CAPTION_KERNELS=paddle (default: numpy)."""
    if _forced_paddle:
        return False
    choice = os.environ.get(KERNELS_ENV, "numpy").strip().lower() or "numpy"
    if choice not in _KERNEL_CHOICES:
        raise UserError(f"{KERNELS_ENV}={choice!r}: expected one of {', '.join(_KERNEL_CHOICES)}")
    return choice == "numpy"


@contextlib.contextmanager
def paddle_kernels():
    """Run Paddle's own attention/RoPE/head kernels inside this block, as on a GPU."""
    global _forced_paddle
    _forced_paddle += 1
    try:
        yield
    finally:
        _forced_paddle -= 1


def numpy_capable(*tensors) -> bool:
    """True when the numpy kernels are on and every tensor is float32 on the CPU (the case they serve),
    in dygraph only: while `paddle.jit.to_static` traces a graph the tensors are symbolic values that
    numpy cannot read, so an exported graph always holds Paddle's kernels (deploy/export.py)."""
    return paddle.in_dynamic_mode() and numpy_kernels_enabled() and all(
        t.place.is_cpu_place() and t.dtype == paddle.float32 for t in tensors)


def as_numpy(tensor) -> np.ndarray:
    """A read-only numpy view of a CPU tensor's memory (a copy only if it is not dense)."""
    try:
        # detach(): Paddle refuses __dlpack__ on a tensor that requires grad (a parameter), and the
        # fallback copy of the 39 MB head weight costs ~40 ms per call; detach shares the memory.
        return np.from_dlpack(tensor.detach())
    except (BufferError, TypeError, RuntimeError, ValueError):
        return tensor.numpy()


def from_numpy(array: np.ndarray):
    """A Paddle tensor over a numpy array's memory (no copy)."""
    return paddle.utils.dlpack.from_dlpack(np.ascontiguousarray(array))


def byte_view(tensor) -> np.ndarray:
    """A writable uint8 view of a dense CPU tensor's memory, for any dtype (bfloat16 included, which
    neither numpy nor DLPack-to-numpy can express). The tensor must outlive the view."""
    if not tensor.place.is_cpu_place():
        raise ValueError("byte_view needs a CPU tensor")
    nbytes = int(tensor.numel()) * tensor.element_size()
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer((ctypes.c_char * nbytes).from_address(tensor.data_ptr()), dtype=np.uint8)
