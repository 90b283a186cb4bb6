"""records.jsonl: the cleaned dataset, as pointers into the source TSV (images are never copied).

The contest TSV (`id \\t base64-image \\t caption`, one row per line) is ~100 GB, so the converter
(`paddle_caption.data.convert`) does not copy images out of it. Each kept row becomes one JSON line

    {"id": str, "caption": str, "tsv": "<absolute path of the source TSV>",
     "offset": <byte offset of the row's first byte>, "length": <row length in bytes, newline excluded>,
     "width": int, "height": int}

and `read_image_bytes(record)` reads the row back with one positional read and base64-decodes its
image column. The TSV must therefore stay where it was, unchanged; a moved or edited file is detected
(the row read back must carry the record's id) rather than silently yielding the wrong image.

This module also holds the TSV line reader shared by the converter and the analyser.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..runtime import UserError, atomic_write
from .images import b64decode_strict

RECORD_KEYS = ("id", "caption", "tsv", "offset", "length", "width", "height")
_KEY_TYPES = {"id": str, "caption": str, "tsv": str, "offset": int, "length": int, "width": int, "height": int}

# A row longer than this is rejected unread: it bounds the memory one row can take.
DEFAULT_MAX_ROW_BYTES = 32 * 1024 * 1024


class RecordError(ValueError):
    """A record that does not match its TSV row (moved/edited file, or a malformed row)."""


# --------------------------------------------------------------------------------- TSV rows
@dataclass
class TsvLine:
    offset: int  # byte offset of the row's first byte
    length: int  # row length in bytes, without the "\n" (and without a "\r" before it)
    data: bytes | None  # the row's bytes; None if it is longer than max_row_bytes


def normalize_id(raw: str) -> str:
    """Ids are compared and stored without surrounding whitespace or a UTF-8 byte-order mark."""
    return raw.strip().lstrip("\ufeff").strip()


def iter_lines(handle, start: int = 0, end: int | None = None, *,
               max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, block_size: int = 1 << 20) -> Iterator[TsvLine]:
    """Yield the rows of a binary file whose first byte lies in [start, end).

    Byte ranges split at arbitrary points still partition the rows exactly: a row that straddles
    `start` belongs to the range before. Memory is one block plus one row, whatever the file size;
    a row longer than `max_row_bytes` is yielded with `data=None` instead of being held.
    """
    end = float("inf") if end is None else end
    pos = start
    if start > 0:
        handle.seek(start - 1)
        if handle.read(1) != b"\n":  # `start` is inside a row: it belongs to the previous range
            while True:
                block = handle.read(block_size)
                if not block:
                    return
                i = block.find(b"\n")
                if i >= 0:
                    pos = handle.tell() - len(block) + i + 1
                    break
    handle.seek(pos)
    pending: list[bytes] = []  # pieces of the current row (several only for rows longer than a block)
    pending_len = 0
    too_long = False
    while pos < end:
        block = handle.read(block_size)
        if not block:  # EOF: a last row without a newline
            if pending_len or too_long:
                yield _make_line(pos, pending, pending_len, too_long)
            return
        i = 0
        while True:
            j = block.find(b"\n", i)
            if j < 0:
                pending_len += len(block) - i
                if pending_len > max_row_bytes:
                    too_long, pending = True, []
                elif i < len(block):
                    pending.append(block[i:])
                break
            pending_len += j - i
            if pending_len > max_row_bytes:
                too_long, pending = True, []
            else:
                pending.append(block[i:j])
            yield _make_line(pos, pending, pending_len, too_long)
            pos += pending_len + 1
            pending, pending_len, too_long = [], 0, False
            i = j + 1
            if pos >= end:
                return


def _make_line(offset: int, pieces: list[bytes], size: int, too_long: bool) -> TsvLine:
    if too_long:
        return TsvLine(offset, size, None)
    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if data.endswith(b"\r"):  # a CRLF file
        data = data[:-1]
    return TsvLine(offset, len(data), data)


# --------------------------------------------------------------------------------- records I/O
def dump_record(record: dict) -> str:
    """One records.jsonl line (without the newline), keys in contract order."""
    return json.dumps({k: record[k] for k in RECORD_KEYS}, ensure_ascii=False)


def parse_record(line: str, where: str = "record") -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")
    for key, kind in _KEY_TYPES.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: key {key!r} missing or not {kind.__name__}")
    return record


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    """Stream the records of a records.jsonl file (blank lines are skipped)."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read records file {path}: {err.strerror or err}") from None
    with handle:
        try:
            for lineno, line in enumerate(handle, 1):
                if line.strip():
                    yield parse_record(line, f"{path}:{lineno}")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None


def load_records(path: str | os.PathLike) -> list[dict]:
    return list(iter_records(path))


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records.jsonl atomically (temp file + rename); returns the number written."""
    n = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(dump_record(record) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------------- reading images
# One read-only descriptor per (process, TSV): DataLoader workers call read_image_bytes for every
# sample. The pid in the key makes a forked worker open its own descriptor instead of using the
# parent's; os.pread never moves a file position, so even a shared descriptor would be safe.
_FDS: dict[tuple[int, str], int] = {}


def _fd(path: str) -> int:
    key = (os.getpid(), path)
    fd = _FDS.get(key)
    if fd is None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        _FDS[key] = fd
    return fd


def read_row_bytes(record: dict) -> bytes:
    """The record's TSV row (without its newline), read with one positional read."""
    path, offset, length = record["tsv"], int(record["offset"]), int(record["length"])
    row = os.pread(_fd(path), length, offset)
    if len(row) != length:
        raise RecordError(f"{path}: row of record {record['id']!r} at byte {offset} is past the end "
                          f"of the file (was the TSV changed after conversion?)")
    return row


def read_image_bytes(record: dict) -> bytes:
    """The record's image file bytes (strict base64 decode of the row's second column).

    Raises RecordError (a ValueError) if the row no longer matches the record, and
    `images.ImageRejected` (also a ValueError) if its base64 is invalid.
    """
    cols = read_row_bytes(record).split(b"\t")
    if len(cols) != 3 or normalize_id(cols[0].decode("utf-8", "replace")) != record["id"]:
        raise RecordError(f"{record['tsv']}: the row at byte {record['offset']} is not record "
                          f"{record['id']!r} (was the TSV changed after conversion?)")
    return b64decode_strict(cols[1])
