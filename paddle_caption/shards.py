"""Sharded output of several processes, resumable, merged by rank 0: the one protocol of batch
prediction (`predict/run.py`) and of curation's model stages (`curate/runner.py`).

A run of W processes splits its items round-robin: rank R takes the items i with i % W == R
(`share`). Each rank appends its results to its own shard file, named after the output the shards
merge into (`shard_path`: OUTPUT.partial for one process, OUTPUT.partial.rank{R}-of-{W} for
several), in JSON lines:

    {"format": FORMAT, "fingerprint": FP}     what made the file: the run's input and settings
    <item>                                    one line per result; a batch is flushed and fsynced together
    {"complete": N}                           the rank's whole share (N items) is in the file

A killed rank resumes after the last complete line of a shard with its own fingerprint (a torn last
line is cut off); a shard with another fingerprint is started over. Rank 0 waits until every shard is
complete with this run's fingerprint (a stale file of an earlier run is waited past, never merged)
and holds the share's item count (`wait_for_shards`), then merges. The shards are deleted by the
caller once the merged output is written. Ranks share only files: all must see the same directory
(one machine, or a shared file system).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .files import atomic_write, json_line
from .runtime import UserError

FORMAT = "paddle_caption.shard/1"


def share(items: Iterable, rank: int, world: int) -> Iterator:
    """The items i with i % world == rank, in input order."""
    return (item for i, item in enumerate(items) if i % world == rank)


def share_size(total: int, rank: int, world: int) -> int:
    return len(range(rank, total, world))


def shard_path(output: str | os.PathLike, rank: int, world: int) -> Path:
    output = Path(output)
    suffix = ".partial" if world == 1 else f".partial.rank{rank}-of-{world}"
    return output.with_name(output.name + suffix)


def fingerprint(parts: dict, length: int = 16) -> str:
    """A short hash of everything that decides a run's results; equal on every rank of one run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


def file_signature(path: str | os.PathLike) -> list:
    """[absolute path, size, mtime]: a changed input file changes the fingerprint."""
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


# ------------------------------------------------------------------------------------ reading
@dataclass
class ShardState:
    """What a shard file holds: its header's fingerprint, its items, whether it is complete."""

    fingerprint: str | None = None  # None: no file, or its header line was torn
    count: int = 0
    items: list = field(default_factory=list)  # only with read_shard(..., keep_items=True)
    complete: bool = False
    valid_bytes: int = 0  # length of the readable prefix (a torn last line is cut off)

    def keyed(self) -> dict:
        """{first field: the other fields} of list items (`[id, value, ...]` lines)."""
        return {item[0]: tuple(item[1:]) for item in self.items}


def read_shard(path: str | os.PathLike, keep_items: bool = False) -> ShardState:
    """Parse a shard file, streamed; a missing file or a torn header is an empty state."""
    state = ShardState()
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return state
    with handle:
        for lineno, raw in enumerate(handle, 1):
            if not raw.endswith(b"\n"):
                break  # torn by a crash mid-write
            try:
                item = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{path}:{lineno}: corrupt shard line; delete the file to compute "
                                f"this shard again") from None
            if lineno == 1:
                if not (isinstance(item, dict) and item.get("format") == FORMAT):
                    raise UserError(f"{path}: not a {FORMAT} shard file; delete it to compute this shard again")
                state.fingerprint = item.get("fingerprint")
            elif isinstance(item, dict) and set(item) == {"complete"}:
                state.complete = True
            elif state.complete:
                raise UserError(f"{path}:{lineno}: a line after the completion line; delete the file "
                                f"to compute this shard again")
            else:
                state.count += 1
                if keep_items:
                    state.items.append(item)
            state.valid_bytes += len(raw)
    return state


def iter_items(path: str | os.PathLike) -> Iterator[str]:
    """The item lines (JSON text, newline included) of a complete shard file, streamed."""
    with open(path, encoding="utf-8") as handle:
        next(handle, None)  # the header
        for line in handle:
            # only the completion line is parsed (`{"complete":N}`): the items pass through as text
            if line.startswith('{"complete"'):
                item = json.loads(line)
                if isinstance(item, dict) and set(item) == {"complete"}:
                    return
            yield line


# ------------------------------------------------------------------------------------ writing
class ShardWriter:
    """One rank's shard file, append-only: each batch is written, flushed and fsynced together.

    With `resume` (the state read from the same path) of this run's fingerprint, the file is cut
    back to its readable prefix and appended to; otherwise it is started over.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str, resume: ShardState | None = None):
        self.path = Path(path)
        if resume is not None and resume.fingerprint == fingerprint:
            with open(self.path, "r+b") as handle:  # drop a torn last line before appending
                handle.truncate(resume.valid_bytes)
            self.handle = open(self.path, "a", encoding="utf-8")
        else:
            self.handle = open(self.path, "w", encoding="utf-8")
            self.add([{"format": FORMAT, "fingerprint": fingerprint}])

    def add(self, items: Iterable) -> None:
        self.handle.write("".join(json_line(item) + "\n" for item in items))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def finish(self, count: int) -> None:
        self.add([{"complete": count}])

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------ merging
def wait_for_shards(output: str | os.PathLike, ranks: Iterable[int], world: int, total: int | None,
                    fingerprint: str, timeout: float, poll_seconds: float = 1.0,
                    keep_items: bool = False) -> dict[int, ShardState]:
    """Rank 0: block until the shard of every rank in `ranks` is complete with this run's
    fingerprint; {rank: its state}. A complete shard whose count is not its share of `total` items
    (None: of the shards' sum, when `ranks` is every rank) is an error: an edited file, or a share
    of another split."""
    states: dict[int, ShardState] = {}
    pending = list(ranks)
    deadline = time.monotonic() + timeout
    announced = False
    while pending:
        for rank in list(pending):
            path = shard_path(output, rank, world)
            state = read_shard(path, keep_items)
            if state.fingerprint != fingerprint or not state.complete:
                continue  # not started, still running, or a stale file the rank will overwrite
            states[rank] = state
            pending.remove(rank)
        if not pending:
            break
        if time.monotonic() > deadline:
            names = ", ".join(str(shard_path(output, r, world)) for r in pending)
            raise UserError(f"timed out after {timeout:.0f} s waiting for shard(s): {names}")
        if not announced:
            print(f"rank 0: waiting for rank(s) {', '.join(map(str, pending))} to finish", file=sys.stderr)
            announced = True
        time.sleep(poll_seconds)
    total = sum(s.count for s in states.values()) if total is None else total
    for rank, state in states.items():
        if state.count != share_size(total, rank, world):
            raise UserError(f"{shard_path(output, rank, world)}: complete but holds {state.count} items, not "
                            f"its share of {share_size(total, rank, world)}; delete it and rerun rank {rank}")
    return states


def merge_round_robin(output: str | os.PathLike, world: int, fingerprint: str, timeout: float,
                      poll_seconds: float = 1.0) -> int:
    """Rank 0: wait for every shard of items computed in input order, then write them into `output`
    round-robin (item i is the next line of shard i % world), atomically: a sharded run writes
    exactly what one process writes. The shards are deleted; returns the item count."""
    states = wait_for_shards(output, range(world), world, None, fingerprint, timeout, poll_seconds)
    total = sum(state.count for state in states.values())
    readers = [iter_items(shard_path(output, rank, world)) for rank in range(world)]
    with atomic_write(output) as out:
        for i in range(total):
            out.write(next(readers[i % world]))
    for reader in readers:
        reader.close()
    for rank in range(world):
        shard_path(output, rank, world).unlink()
    return total


def wait_for_file(path: Path, timeout: float, poll: float = 1.0, what: str = "") -> None:
    """Ranks other than 0: block until rank 0 has written `path` (a stage's done marker)."""
    deadline = time.monotonic() + timeout
    announced = False
    while not path.exists():
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout:.0f} s waiting for {what or path}")
        if not announced:
            print(f"waiting for {what or path}", file=sys.stderr)
            announced = True
        time.sleep(poll)
