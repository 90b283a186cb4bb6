"""The statistics pass of a model operation, split across processes, resumable.

Under `python -m paddle.distributed.launch --nproc_per_node W tools/curate.py RECIPE` (or with
`--rank/--world_size`), rank R computes the items i with i % W == R of the stage's statistics pass,
in batches, and appends the computed samples to `stats.rank{R}-of-{W}.jsonl` in the stage directory,
flushed per batch; a `.done` file beside it holds its count when it is complete. Rank 0 then merges
the shards round-robin — item i is the next line of shard i % W — into the stage's stats file, in
input order, so a sharded run writes exactly what one process writes (tested). A killed run resumes
each shard after its last complete line (a torn last line is cut off).

Ranks only share files: all must see the same directory (one machine or a shared file system).
"""
from __future__ import annotations

import json
import os
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

from ..files import atomic_write
from ..runtime import UserError
from .samples import dump_sample


def shard_path(stage_dir: Path, rank: int, world: int) -> Path:
    return Path(stage_dir) / f"stats.rank{rank}-of-{world}.jsonl"


def _done_path(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def _complete_lines(path: Path) -> int:
    """Complete lines of a shard file; a torn last line (a killed writer) is cut off the file."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
    return data[:end].count(b"\n")


def compute_shard(items: Iterator[dict], compute_batch: Callable[[list[dict]], None], stage_dir: Path,
                  rank: int, world: int, batch_size: int, *, progress: bool = True, total: int | None = None,
                  desc: str = "stats") -> int:
    """Compute this rank's items (i % world == rank) in batches into its shard file; returns its count."""
    from tqdm import tqdm

    path = shard_path(stage_dir, rank, world)
    if _done_path(path).exists():
        return int(_done_path(path).read_text())
    done = _complete_lines(path)
    mine = (item for i, item in enumerate(items) if i % world == rank)
    mine = islice(mine, done, None)  # resume: skip what the shard already holds
    count = done
    share = None if total is None else len(range(rank, total, world))
    with open(path, "a", encoding="utf-8") as out, \
            tqdm(total=share, initial=done, unit="row", disable=not progress, dynamic_ncols=True,
                 desc=desc if world == 1 else f"{desc} rank {rank}/{world}") as bar:
        while True:
            batch = list(islice(mine, batch_size))
            if not batch:
                break
            compute_batch(batch)
            out.write("".join(dump_sample(s) + "\n" for s in batch))
            out.flush()
            os.fsync(out.fileno())
            count += len(batch)
            bar.update(len(batch))
    with atomic_write(_done_path(path)) as handle:
        handle.write(str(count))
    return count


def wait_for_file(path: Path, timeout: float, poll: float = 1.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    announced = False
    while not path.exists():
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout:.0f} s waiting for {what or path}")
        if not announced:
            print(f"waiting for {what or path}", file=sys.stderr)
            announced = True
        time.sleep(poll)


def merge_shards(stage_dir: Path, world: int, out_path: Path, timeout: float) -> int:
    """Rank 0: wait for every shard, then write them round-robin (input order) into `out_path`."""
    paths = [shard_path(stage_dir, r, world) for r in range(world)]
    for rank, path in enumerate(paths):
        wait_for_file(_done_path(path), timeout, what=f"rank {rank}'s statistics ({path})")
    counts = [int(_done_path(p).read_text()) for p in paths]
    total = sum(counts)
    if any(c != len(range(r, total, world)) for r, c in enumerate(counts)):
        raise UserError(f"{stage_dir}: shard sizes {counts} do not split {total} rows round-robin; "
                        "delete the stage directory and rerun")
    handles = [open(p, encoding="utf-8") for p in paths]
    try:
        with atomic_write(out_path) as out:
            for i in range(total):
                line = handles[i % world].readline()
                json.loads(line)  # a corrupt shard is an error here, not a silently short file
                out.write(line)
    finally:
        for handle in handles:
            handle.close()
    for path in paths:
        path.unlink()
        _done_path(path).unlink()
    return total
