"""records.jsonl: the cleaned dataset, as pointers into the source TSV (images are never copied).

The contest TSV (`id \\t base64-image \\t caption`, one row per line) is ~100 GB, so the converter
(`paddle_caption.data.convert`) does not copy images out of it. Each kept row becomes one JSON line

    {"id": str, "caption": str, "tsv": "<absolute path of the source TSV>",
     "offset": <byte offset of the row's first byte>, "length": <row length in bytes, newline excluded>,
     "width": int, "height": int}

This module is the one place the schema is written down: `RECORD_KEYS` (written by the converter
and curation, read by the dataset), `TRAINING_KEYS` (what a training sample needs of a record) and
`iter_captions` (the captions alone: the speculative drafter's datastore).

`read_image_bytes(record)` reads the row back with one positional read and base64-decodes its
image column. The row may also be a two-column `id \t base64` row (an unlabeled pool, or MUGE's
`IC_*.tsv`): the caption is the record's. Several records may point at one row (the references of a
multi-caption image, repeats written by curation) and then share its id. The TSV must therefore stay where it was, unchanged; a moved or edited file is detected
(the row read back must carry the record's id) rather than silently yielding the wrong image.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from ..files import iter_text_lines, write_lines
from ..runtime import UserError
from .contest_tsv import RowError, parse_row, read_line_at
from .images import b64decode_strict

RECORD_TYPES = {"id": str, "caption": str, "tsv": str, "offset": int, "length": int, "width": int, "height": int}
RECORD_KEYS = tuple(RECORD_TYPES)
# What a training sample needs of a record: its caption and its image row (the image's width and
# height are the converter's and curation's, not the dataset's).
TRAINING_KEYS = ("id", "caption", "tsv", "offset", "length")
# Written after the contract keys when a record has them: a caption written by a model (curation's
# pseudo-labels), and the curation score it was kept with.
OPTIONAL_RECORD_KEYS = ("synthetic", "score")


class RecordError(ValueError):
    """A record that does not match its TSV row (moved/edited file, or a malformed row)."""


# --------------------------------------------------------------------------------- records I/O
def new_record(id: str, caption: str, tsv: str, offset: int, length: int, width: int, height: int) -> dict:
    """A record of the row at `offset` of `tsv` (absolute path), its image `width` x `height`."""
    return {"id": id, "caption": caption, "tsv": tsv, "offset": offset, "length": length,
            "width": width, "height": height}


def dump_record(record: dict) -> str:
    """One records.jsonl line (without the newline), keys in contract order."""
    out = {k: record[k] for k in RECORD_KEYS}
    out.update({k: record[k] for k in OPTIONAL_RECORD_KEYS if record.get(k) not in (None, False)})
    return json.dumps(out, ensure_ascii=False)


def missing_keys(record: dict, keys=RECORD_KEYS) -> list[str]:
    return [k for k in keys if k not in record]


def parse_record(line: str, where: str = "record", keys=RECORD_KEYS) -> dict:
    """One records.jsonl line, with `keys` checked for presence and type (UserError naming `where`)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")
    for key in keys:
        value, kind = record.get(key), RECORD_TYPES[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UserError(f"{where}: key {key!r} missing or not {kind.__name__}")
    return record


def iter_records(path: str | os.PathLike, keys=RECORD_KEYS) -> Iterator[dict]:
    """Stream the records of a records.jsonl file (blank lines are skipped), `keys` checked."""
    for where, line in iter_text_lines(path, "records file"):
        yield parse_record(line, where, keys)


def iter_captions(path: str | os.PathLike) -> Iterator[str]:
    """The captions of a records.jsonl, or of any JSON-lines file whose objects carry a "caption"
    string (curated samples, a caption export), streamed; a bad line is a UserError naming
    `path:line`."""
    for where, line in iter_text_lines(path, "captions file"):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("caption"), str):
            raise UserError(f'{where}: expected an object with a "caption" string')
        yield item["caption"]


def load_records(path: str | os.PathLike) -> list[dict]:
    return list(iter_records(path))


def load_named_records(path: str) -> list[dict]:
    """The records file a config names: as given, else among the packaged files; missing is one line."""
    from ..resources import resolve

    resolved = resolve(path)
    if resolved is None or not Path(resolved).is_file():
        raise UserError(f"{path}: records file not found (run tools/convert_labels.py first)")
    return load_records(resolved)


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records.jsonl atomically (temp file + rename); returns the number written."""
    return write_lines(path, map(dump_record, records))


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
    row = read_line_at(_fd(path), offset, length)
    if len(row) != length:
        raise RecordError(f"{path}: row of record {record['id']!r} at byte {offset} is past the end "
                          f"of the file (was the TSV changed after conversion?)")
    return row


def read_image_bytes(record: dict) -> bytes:
    """The record's image file bytes (strict base64 decode of the row's second column).

    Raises RecordError (a ValueError) if the row no longer matches the record, and
    `images.ImageRejected` (also a ValueError) if its base64 is invalid.
    """
    try:
        row = parse_row(read_row_bytes(record), test=True)
    except RowError:
        row = None
    if row is None or row.id != record["id"]:
        raise RecordError(f"{record['tsv']}: the row at byte {record['offset']} is not record "
                          f"{record['id']!r} (was the TSV changed after conversion?)")
    return b64decode_strict(row.image_b64)
