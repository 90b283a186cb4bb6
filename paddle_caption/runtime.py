"""Process set-up for every command: CPU threads, a quiet Paddle import, one-line user errors.

Commands call `configure(num_threads)` once their arguments are parsed. Library modules never
configure anything on import: they `import paddle` and leave the process as the caller set it up.

Why threads are set at run time, not only through environment variables: numpy's OpenBLAS reads
OPENBLAS_NUM_THREADS when numpy is first imported, which in a real program happens long before a
command has parsed `--num_threads`; and Paddle prints a two-line warning at import whenever
OMP_NUM_THREADS is above 1. So Paddle is imported with one OpenMP thread and then given the
wanted count (`set_num_threads`, which reaches its math library), and numpy's BLAS pool is resized
with threadpoolctl, whenever numpy was imported.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_PADDLE = None
_THREADS: int | None = None


class UserError(Exception):
    """A problem with the user's input: commands print it as one line and exit with status 2."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def quiet_environment() -> None:
    """Variables and filters that keep Paddle/PaddleNLP imports from printing on a normal run."""
    os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    os.environ.setdefault("PPNLP_HOME", str(Path.home() / ".cache" / "paddle_caption" / "paddlenlp"))
    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore", message=".*No ccache found.*")
    warnings.filterwarnings("ignore", message=".*distutils.*")


def requested_threads(num_threads: int | None = None) -> int:
    """An explicit count, else OMP_NUM_THREADS if the user set it, else every core."""
    if num_threads:
        return int(num_threads)
    try:
        return int(os.environ.get("OMP_NUM_THREADS", "")) or cpu_count()
    except ValueError:
        return cpu_count()


def configure(num_threads: int | None = None):
    """Set this process's CPU threads (Paddle and numpy's BLAS) and import Paddle quietly.

    Idempotent; a later call with another count changes it. Child processes (DataLoader workers,
    subprocesses) inherit the count through the environment variables. Returns the paddle module.
    """
    global _THREADS
    threads = requested_threads(num_threads)
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    quiet_environment()
    paddle = _import_paddle()
    if threads != _THREADS:
        paddle.base.core.set_num_threads(threads)
        if "numpy" in sys.modules:  # numpy loaded before us: resize its BLAS pool in place
            import threadpoolctl

            threadpoolctl.threadpool_limits(threads, user_api="blas")
        _THREADS = threads
    return paddle


def _import_paddle():
    """Import paddle once with OMP_NUM_THREADS=1 (its import-time warning fires above 1)."""
    global _PADDLE
    if _PADDLE is None:
        wanted = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            import paddle
        finally:
            if wanted is not None:
                os.environ["OMP_NUM_THREADS"] = wanted
        if not paddle.is_compiled_with_cuda():
            with contextlib.suppress(Exception):
                paddle.set_device("cpu")
        _PADDLE = paddle
    return _PADDLE


M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
SERVICE_MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = SERVICE_MALLOC_ARENAS, libc=None) -> bool:
    """Cap glibc malloc's arenas at `arenas` for threads that allocate from now on, unless the user
    set MALLOC_ARENA_MAX (glibc then read it at start). True if the cap was set.

    Why (issue 26, the service's soak): the engine thread, the event loop and the thread pools each
    get a malloc arena of their own (up to 8 per core), and the model's short-lived tensors leave
    freed but unreturned memory in every one of them, so RSS kept rising under mixed traffic. In
    rounds of the soak's traffic (16 requests each) against the demo model, RSS went 676 -> 769 MB
    in 8 rounds and on to 863 MB by round 30 with glibc holding 132 -> 264 MB of free chunks; with
    2 arenas it levelled at 680-690 MB from round 7 on, with the same CPU time per round (a fixed
    mmap threshold also kept RSS flat but cost ~35% more CPU in page faults). The cap must be in
    place before the threads start, so the serve command calls this first. A no-op off glibc.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        if libc is None:
            import ctypes

            libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_ARENA_MAX, int(arenas)))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to cap
        return False


def run_cli(main_fn, argv=None) -> int:
    """Run a command's `main_fn(argv)`, turning UserError into a one-line message and exit code 2."""
    try:
        return int(main_fn(argv) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
