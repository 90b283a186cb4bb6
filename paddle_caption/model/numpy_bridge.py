"""Zero-copy crossings between Paddle CPU tensors and numpy, and when the numpy kernels apply.

The output layer (`head.py`) and the attention core and RoPE (`attention.py`) run in numpy on CPU
because Paddle's CPU kernels for those shapes are several times slower (docs/benchmarks.md). Both
decide with `numpy_capable` and cross through DLPack without copying: `tensor.numpy()` would copy
the 39 MB [hidden x vocab] head weight on every call, which cost as much as the product itself.
"""
from __future__ import annotations

import numpy as np
import paddle

def numpy_capable(*tensors) -> bool:
    """True when every tensor is float32 on the CPU: the numpy kernels serve exactly that case."""
    return all(t.place.is_cpu_place() and t.dtype == paddle.float32 for t in tensors)


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
