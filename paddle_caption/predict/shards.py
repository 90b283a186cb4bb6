"""The file protocol of batch prediction: partial results, resume, shards of several processes.

Crash safety: each batch's results are appended to RESULTS.txt.partial (JSON lines, flushed and
fsynced per batch). A resumed run keeps what the partial file holds if it was made with the same
input, model, prompt and generation settings (a fingerprint on its first line says so) and predicts
only the rest; a torn last line is dropped. RESULTS.txt itself is written once, complete and
atomically, and then the partial file is deleted.

Several processes: rank R of W predicts the rows i with i % W == R into
RESULTS.txt.partial.rank{R}-of-{W} and ends it with a completion line. Rank 0 waits until every
shard is complete (same fingerprint, exactly its own ids) and merges them into RESULTS.txt. All
ranks must see the same directory (one machine, or a shared file system).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_write, remove_stale_temps
from ..runtime import UserError
from .inputs import TestRow

PARTIAL_FORMAT = "paddle_caption.predict.partial/1"


def shard_rows(rows: list[TestRow], rank: int, world_size: int) -> list[TestRow]:
    return [row for row in rows if row.index % world_size == rank]


def partial_path(results_path: Path, rank: int, world_size: int) -> Path:
    suffix = ".partial" if world_size == 1 else f".partial.rank{rank}-of-{world_size}"
    return results_path.with_name(results_path.name + suffix)


def rejects_path(results_path: Path) -> Path:
    return results_path.with_name(results_path.name + ".rejects")


@dataclass
class PartialState:
    """What a partial file holds: its header, {id: (caption, reject reason)}, completion."""

    fingerprint: str | None = None
    results: dict = field(default_factory=dict)
    complete: bool = False
    valid_bytes: int = 0  # length of the readable prefix (a torn last line is cut off)


def read_partial(path: Path) -> PartialState:
    """Parse a partial file; a missing file or torn header is an empty state."""
    state = PartialState()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return state
    pos = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        end = pos + len(raw) + 1
        if end > len(data):  # no newline: torn by a crash mid-write
            break
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}:{lineno}: corrupt partial results; delete the file or run "
                            f"without --resume") from None
        if lineno == 1:
            if not (isinstance(item, dict) and item.get("format") == PARTIAL_FORMAT):
                raise UserError(f"{path}: not a predict partial file; delete it or run without --resume")
            state.fingerprint = item.get("fingerprint")
        elif isinstance(item, list) and len(item) == 3:
            state.results[item[0]] = (item[1], item[2])
        elif isinstance(item, dict) and "complete" in item:
            state.complete = True
        else:
            raise UserError(f"{path}:{lineno}: unexpected line in partial results; delete the file "
                            f"or run without --resume")
        pos = end
    state.valid_bytes = pos
    return state


class PartialWriter:
    """Append-only results of one rank: each batch is written, flushed and fsynced together."""

    def __init__(self, path: Path, fingerprint: str, resume_from: PartialState | None):
        self.path = path
        if resume_from is not None and resume_from.fingerprint is not None:
            with open(path, "r+b") as handle:  # drop a torn last line before appending
                handle.truncate(resume_from.valid_bytes)
            self.handle = open(path, "a", encoding="utf-8")
        else:
            self.handle = open(path, "w", encoding="utf-8")
            self._write([{"format": PARTIAL_FORMAT, "fingerprint": fingerprint}])

    def _write(self, items) -> None:
        self.handle.write("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def add(self, results: list[tuple[str, str, str]]) -> None:
        """(id, caption, reject reason or "") per image of one batch."""
        self._write([list(r) for r in results])

    def finish(self, n: int) -> None:
        self._write([{"complete": n}])

    def close(self) -> None:
        self.handle.close()


def fingerprint(test_tsv: Path, n_rows: int, settings: dict) -> str:
    """A short hash of the input file and every setting that decides the results; equal on every
    rank of one run."""
    stat = test_tsv.stat()
    parts = {"test": [str(test_tsv.resolve()), stat.st_size, stat.st_mtime_ns, n_rows], **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def wait_for_shards(results_path: Path, rows: list[TestRow], world_size: int, fp: str,
                    timeout: float, poll_seconds: float) -> dict:
    """Rank 0: block until every other rank's partial file is complete; return all their results."""
    merged: dict = {}
    pending = list(range(1, world_size))
    deadline = time.monotonic() + timeout
    announced = False
    while pending:
        for rank in list(pending):
            path = partial_path(results_path, rank, world_size)
            state = read_partial(path)
            if state.fingerprint != fp or not state.complete:
                continue  # not started, still running, or a stale file the rank will overwrite
            expected = {row.id for row in shard_rows(rows, rank, world_size)}
            extra = set(state.results) - expected
            missing = expected - set(state.results)
            if extra or missing:
                raise UserError(f"{path}: complete but {len(missing)} ids missing and {len(extra)} "
                                f"ids that are not this shard's; delete it and rerun rank {rank}")
            merged.update(state.results)
            pending.remove(rank)
        if not pending:
            break
        if time.monotonic() > deadline:
            names = ", ".join(str(partial_path(results_path, r, world_size)) for r in pending)
            raise UserError(f"timed out after {timeout:.0f} s waiting for shard(s): {names}")
        if not announced:
            print(f"rank 0: waiting for rank(s) {', '.join(map(str, pending))} to finish", file=sys.stderr)
            announced = True
        time.sleep(poll_seconds)
    return merged


def write_outputs(results_path: Path, rows: list[TestRow], results: dict) -> int:
    """RESULTS.txt (every id, input order) and RESULTS.txt.rejects, each atomically; returns #rejects."""
    missing = [row.id for row in rows if row.id not in results]
    if missing:  # cannot happen unless a shard file was edited: never write an incomplete file
        raise UserError(f"no result for {len(missing)} id(s), e.g. {missing[0]!r}")
    remove_stale_temps(results_path)
    remove_stale_temps(rejects_path(results_path))
    n_rejects = 0
    with atomic_write(rejects_path(results_path)) as rejects:
        for row in rows:
            reason = results[row.id][1]
            if reason:
                rejects.write(f"{row.id}\t{reason}\n")
                n_rejects += 1
    with atomic_write(results_path) as out:
        for row in rows:
            out.write(f"{row.id}\t{results[row.id][0]}\n")
    return n_rejects


# ------------------------------------------------------------------------------------ the run
