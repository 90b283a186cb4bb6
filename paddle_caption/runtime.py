"""Process-wide runtime set-up: quiet imports, CPU threads, atomic file writes.

Everything that must happen *before* `import paddle` lives here, so every entry point calls
`import_paddle()` instead of importing paddle directly.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from pathlib import Path

_PADDLE = None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def configure_environment(num_threads: int | None = None) -> None:
    """Set the variables Paddle reads at import time.

    Paddle uses one CPU thread by default, which halves matmul speed on a 2-core machine, so the
    thread count defaults to the core count unless the user already chose one.
    """
    threads = str(num_threads or cpu_count())
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    os.environ.setdefault("MKL_NUM_THREADS", threads)
    # numpy's OpenBLAS does the CPU output layer (model/head.py); it reads this when numpy loads
    os.environ.setdefault("OPENBLAS_NUM_THREADS", threads)
    os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    os.environ.setdefault("PPNLP_HOME", str(Path.home() / ".cache" / "paddle_caption" / "paddlenlp"))
    os.environ.setdefault("GLOG_minloglevel", "2")
    warnings.filterwarnings("ignore", message=".*No ccache found.*")
    warnings.filterwarnings("ignore", message=".*distutils.*")


def import_paddle(num_threads: int | None = None):
    """Import paddle once, after the environment is configured, and set its CPU threads."""
    global _PADDLE
    if _PADDLE is None:
        configure_environment(num_threads)
        import paddle

        if not paddle.is_compiled_with_cuda():
            with contextlib.suppress(Exception):
                paddle.set_device("cpu")
        _PADDLE = paddle
    return _PADDLE


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temp file beside `path` and rename it into place only on success.

    A killed run therefore never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    kwargs = {} if "b" in mode else {"encoding": encoding}
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete temp files that `atomic_write(path)` left behind when a process was SIGKILLed."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def glob_escape(name: str) -> str:
    return re.sub(r"([*?[])", r"[\1]", name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class UserError(Exception):
    """A problem with the user's input: scripts print it as one line and exit non-zero."""


def run_cli(main_fn, argv=None) -> int:
    """Run a CLI `main_fn(argv)`, turning UserError into a one-line message and exit code 2."""
    import sys

    try:
        return int(main_fn(argv) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
