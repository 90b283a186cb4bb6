"""Writing files so that a killed process never leaves a half-written file under its final name,
and reading line files with errors that name the file and line."""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

import orjson

from .runtime import UserError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temp file beside `path` and rename it into place only on success."""
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


def write_json(path: str | os.PathLike, data) -> None:
    """Pretty, UTF-8 JSON with a final newline, written atomically."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def _plain(value):
    """What orjson does not serialise itself: numpy scalars and arrays (a statistic computed with numpy)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def json_line(value) -> str:
    """`value` as one line of JSON (UTF-8 text kept readable, no newline). orjson, not json: curation
    writes and re-reads every row several times per stage, and `json.dumps(ensure_ascii=False)` was
    ~12% of its non-model operations' CPU time (bench/curate.py). NaN is written as null."""
    return orjson.dumps(value, default=_plain).decode()


def write_lines(path: str | os.PathLike, lines) -> int:
    """Write an iterable of text lines (without their newlines) atomically; returns how many."""
    n = 0
    with atomic_write(path) as handle:
        for line in lines:
            handle.write(line + "\n")
            n += 1
    return n


def iter_text_lines(path: str | os.PathLike, what: str):
    """(where, line) for each non-blank line of a UTF-8 text file, `where` being "path:lineno"; an
    unreadable file or bytes that are not UTF-8 are one-line UserErrors naming `what` and the file."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None
    with handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    yield f"{path}:{lineno}", line
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None


def remove_stale_temps_under(directory: str | os.PathLike) -> None:
    """Delete every temp file `atomic_write` left anywhere under `directory` when a process was
    SIGKILLed (for a directory one process alone writes atomically, as curation's rank 0)."""
    for stale in Path(directory).rglob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


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


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    """A JSON object from `path`, or a one-line UserError naming the file and what is wrong."""
    from .runtime import UserError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: {what} is a directory, not a file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read {what}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} must be a JSON object")
    return data
