"""A training run's log: `log.jsonl` (one JSON record a line), VisualDL scalars when asked for, and the
progress bar. Rank 0 alone writes and shows anything; other ranks get a log that does nothing.

On resume the file keeps only the records up to the resumed step: a killed run may have logged
steps its last checkpoint does not hold, and they are logged again as the run repeats them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..files import atomic_write

LOG_NAME = "log.jsonl"


class RunLog:
    def __init__(self, output_dir: Path, writer: bool, visualdl: bool, resumed_step: int, say=print):
        self.path = Path(output_dir) / LOG_NAME
        self.writer = writer
        self.visualdl = None
        if not writer:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _record_step(line) <= resumed_step]
            with atomic_write(self.path) as handle:
                handle.write("".join(line + "\n" for line in kept))
        if visualdl:
            try:
                from visualdl import LogWriter

                self.visualdl = LogWriter(logdir=str(Path(output_dir) / "visualdl"))
            except ImportError:
                say("visualdl requested but not installed: logging to log.jsonl only")

    def write(self, record: dict) -> None:
        """Append one record ({"kind": "train"|"eval", "step": N, ...})."""
        if not self.writer:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.visualdl is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.visualdl.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def progress_bar(self, total, initial: int, enabled: bool = True):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                    disable=not enabled or not self.writer, file=sys.stderr)


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 10 ** 12  # unreadable (torn) lines are dropped
