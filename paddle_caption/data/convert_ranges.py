"""The worker side of label conversion: check the rows that start in one byte range of the TSV.

Each worker process opens the TSV itself and reads only its range, so image bytes never cross a
pipe; it applies the cleaning recipe's row operations (`clean_rules.check_row`) and returns the kept
rows as records.jsonl lines and the rejected ones as (row, id, reason). The main process
(`convert.Conversion`) takes the results in input order.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

from .clean_rules import CleanConfig, build_recipe, check_row
from .contest_tsv import iter_lines
from .records import dump_record, new_record


@dataclass
class RangeResult:
    end: int  # the range's end offset: the next range starts there
    lines: int  # rows that start inside the range
    kept: list  # (row index in range, id, records.jsonl line)
    rejects: list  # (row index in range, id, reason)


_WORKER: tuple | None = None  # (tsv path, CleanConfig, the recipe's operations), set per process


def init_worker(tsv: str, cfg: CleanConfig, ignore_sigint: bool = True) -> None:
    global _WORKER
    if ignore_sigint:  # Ctrl-C is handled once, by the main process
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER = (tsv, cfg, build_recipe(cfg))


def process_range(bounds: tuple[int, int]) -> RangeResult:
    """Check the rows that start in [start, end) of the worker's TSV."""
    tsv, cfg, ops = _WORKER
    start, end = bounds
    kept, rejects = [], []
    index = 0
    with open(tsv, "rb", buffering=0) as handle:
        for index, line in enumerate(iter_lines(handle, start, end, max_row_bytes=cfg.max_row_bytes), 1):
            if line.data is None:
                rejects.append((index, "", "row_too_long"))
                continue
            reason, rid, caption, width, height = check_row(line.data, ops, muge=bool(cfg.captions))
            if reason:
                rejects.append((index, rid, reason))
            else:
                kept.append((index, rid, dump_record(
                    new_record(rid, caption, tsv, line.offset, line.length, width, height))))
    return RangeResult(end, index, kept, rejects)
