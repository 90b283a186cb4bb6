"""The contest's file layouts, read in one place: image rows, and `id \\t caption` result rows.

Image rows (training, validation, test):

    id \\t base64-image \\t caption        (a test split has only `id \\t base64-image`)

one row per line, UTF-8, no header; a file may end its lines with CRLF and start with a byte-order
mark. The real training file is ~1M rows and ~100 GB, so rows are streamed from byte ranges
(`iter_lines`) and parsed without decoding the ~100 kB image column (`parse_row`). Ids are compared
without surrounding whitespace or a BOM (`normalize_id`). Every problem with a row has a short
reason code (the converter's ledger uses the same codes) and, for messages, a `file:line` place.

Result and reference rows (`id \\t caption`, small files) are read as text with `iter_text_rows`.

MUGE ECommerce-IC (the e-commerce captioning benchmark) splits a split in two files: `IC_*.tsv` with
`image_id \\t base64` rows (the test layout above) and `IC_*.jsonl` with one
`{"image_id": ..., "text": [caption, ...]}` object per image, read by `read_muge_captions`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..files import atomic_write, remove_stale_temps
from ..runtime import UserError

# A row longer than this is rejected unread: it bounds the memory one row can take.
DEFAULT_MAX_ROW_BYTES = 32 * 1024 * 1024
# The id of a row too long to hold is read from its first bytes.
ID_PEEK_BYTES = 4096
TRAIN_LAYOUT = "id<TAB>base64<TAB>caption"
TEST_LAYOUT = "id<TAB>base64[<TAB>caption]"


# --------------------------------------------------------------------------------- lines
@dataclass
class TsvLine:
    offset: int  # byte offset of the row's first byte
    length: int  # row length in bytes, without the "\n" (and without a "\r" before it)
    data: bytes | None  # the row's bytes; None if it is longer than max_row_bytes


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


def read_line_at(fd: int, offset: int, length: int) -> bytes:
    """One row's bytes by position (os.pread never moves a shared descriptor's file position)."""
    return os.pread(fd, length, offset)


# --------------------------------------------------------------------------------- image rows
def normalize_id(raw: str) -> str:
    """Ids are compared and stored without surrounding whitespace or a UTF-8 byte-order mark."""
    return raw.strip().lstrip("\ufeff").strip()


def display_id(raw: bytes) -> str:
    """An id fit for a ledger line, even from a broken row: decoded leniently, one line, bounded."""
    text = normalize_id(raw[:1024].decode("utf-8", "replace"))
    return re.sub(r"[\t\r\n]", " ", text)[:200]


class RowError(ValueError):
    """A row that does not have the contest layout. `reason` is a ledger code; `row_id` is the id
    as far as it could be shown ("" if not at all); `id_readable` says whether the id column itself
    is a valid id (UTF-8, non-empty), i.e. whether a result line could name the row."""

    def __init__(self, reason: str, row_id: str = "", detail: str = "", id_readable: bool = True):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.row_id, self.detail = reason, row_id, detail
        self.id_readable = id_readable and bool(row_id)


@dataclass
class ContestRow:
    id: str
    image_b64: bytes  # the image column, still base64
    caption: str | None  # stripped; None for a test row without a caption column


def parse_row(data: bytes, *, test: bool = False) -> ContestRow:
    """Split one row into its columns, or raise RowError.

    Checks, in this order (the first failing one is the reason): every column that is read is
    UTF-8 (`invalid_utf8`), the column count (`wrong_column_count`: exactly 3, or 2-3 for a test
    row), a non-empty id (`empty_id`). The image column is not decoded when it is ASCII, as base64
    is: that skips ~100 kB of text decoding per row. A test row's caption column is ignored.
    """
    cols = data.split(b"\t")
    count_ok = 2 <= len(cols) <= 3 if test else len(cols) == 3
    # With a wrong column count every column is checked, so invalid text outranks the count.
    wanted = range(len(cols)) if not count_ok else ((0,) if test else (0, 2))
    texts = {}
    for i in wanted:
        try:
            texts[i] = cols[i].decode("utf-8")
        except UnicodeDecodeError:
            raise RowError("invalid_utf8", display_id(cols[0]), f"column {i + 1} is not UTF-8",
                           id_readable=i != 0) from None
    if count_ok and not cols[1].isascii():
        try:
            cols[1].decode("utf-8")
        except UnicodeDecodeError:
            raise RowError("invalid_utf8", display_id(cols[0]), "column 2 is not UTF-8") from None
    if not count_ok:
        raise RowError("wrong_column_count", display_id(cols[0]),
                       f"expected {TEST_LAYOUT if test else TRAIN_LAYOUT}, got {len(cols)} column(s)")
    row_id = normalize_id(texts[0])
    if not row_id:
        raise RowError("empty_id", "", "the id column is empty")
    caption = texts[2].strip() if 2 in texts else None
    return ContestRow(row_id, cols[1], caption)


def peek_id(fd: int, line: TsvLine) -> str:
    """The id of a row too long to hold (its first column, from the first bytes), or ""."""
    head = read_line_at(fd, line.offset, min(line.length, ID_PEEK_BYTES))
    if b"\t" not in head:
        return ""
    try:
        return normalize_id(head.split(b"\t", 1)[0].decode("utf-8"))
    except UnicodeDecodeError:
        return ""


def iter_rows(path: str | os.PathLike, *, test: bool = False, what: str = "file",
              max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> Iterator[tuple[int, TsvLine, ContestRow | RowError]]:
    """(1-based line number, line, parsed row or its RowError) for every non-blank row of a file.

    A row longer than `max_row_bytes` comes as RowError("row_too_long") carrying its peeked id.
    The line's `data` is dropped after parsing, so holding the lines costs a few bytes each.
    """
    with _open(path, what) as handle:
        for lineno, line in enumerate(iter_lines(handle, max_row_bytes=max_row_bytes), 1):
            if line.data is None:
                parsed = RowError("row_too_long", peek_id(handle.fileno(), line), f"{line.length} bytes")
            elif not line.data.strip():
                continue
            else:
                try:
                    parsed = parse_row(line.data, test=test)
                except RowError as err:
                    parsed = err
            yield lineno, TsvLine(line.offset, line.length, None), parsed


def _open(path: str | os.PathLike, what: str):
    from ..runtime import UserError

    try:
        return open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None


# --------------------------------------------------------------------------------- text rows
def iter_text_rows(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, columns) of every non-blank line of a small UTF-8 text TSV.

    CRLF endings and a leading byte-order mark are tolerated; the first undecodable line is a
    UserError naming `path:line`.
    """
    from ..runtime import UserError

    with _open(path, what) as handle:
        for lineno, line in enumerate(iter_lines(handle), 1):
            if line.data is None:
                raise UserError(f"{path}:{lineno}: line longer than {DEFAULT_MAX_ROW_BYTES} bytes")
            try:
                text = line.data.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: not valid UTF-8") from None
            if lineno == 1:
                text = text.lstrip("\ufeff")
            if text.strip():
                yield lineno, text.split("\t")


# --------------------------------------------------------------------------------- MUGE captions
def read_muge_captions(path: str | os.PathLike, what: str = "captions file") -> dict[str, list[str]]:
    """{image id: [captions]} from a MUGE `IC_*.jsonl` (`{"image_id", "text": [...]}` per line;
    `text` may also be one string). A malformed line, or an image id given twice, is a UserError
    naming `path:line`. Captions are stripped; empty ones are kept (the cleaning rules decide)."""
    import json

    from ..runtime import UserError

    captions: dict[str, list[str]] = {}
    for lineno, cols in iter_text_rows(path, what):
        line = "\t".join(cols)
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not JSON ({err.msg})") from None
        texts = item.get("text") if isinstance(item, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not (isinstance(item, dict) and "image_id" in item and isinstance(texts, list)
                and all(isinstance(t, str) for t in texts)):
            raise UserError(f'{path}:{lineno}: expected {{"image_id": ..., "text": [captions]}}')
        image_id = normalize_id(str(item["image_id"]))
        if image_id in captions:
            raise UserError(f"{path}:{lineno}: image id {image_id!r} appears twice")
        captions[image_id] = [t.strip() for t in texts]
    return captions


# ---------------------------------------------------------------------------------- results files
def rejects_path(results_path: str | os.PathLike) -> Path:
    """RESULTS.txt -> RESULTS.txt.rejects: `id \t reason` of every image that got no caption."""
    results_path = Path(results_path)
    return results_path.with_name(results_path.name + ".rejects")


def write_results(results_path: str | os.PathLike, ids: list[str], results: dict) -> int:
    """RESULTS.txt (`id \t caption` for every id, in `ids` order) and RESULTS.txt.rejects, each
    atomically, from {id: (caption, reject reason or "")}; returns the number of rejects."""
    missing = [rid for rid in ids if rid not in results]
    if missing:  # cannot happen unless a shard file was edited: never write an incomplete file
        raise UserError(f"no result for {len(missing)} id(s), e.g. {missing[0]!r}")
    results_path = Path(results_path)
    remove_stale_temps(results_path)
    remove_stale_temps(rejects_path(results_path))
    n_rejects = 0
    with atomic_write(rejects_path(results_path)) as rejects:
        for rid in ids:
            reason = results[rid][1]
            if reason:
                rejects.write(f"{rid}\t{reason}\n")
                n_rejects += 1
    with atomic_write(results_path) as out:
        for rid in ids:
            out.write(f"{rid}\t{results[rid][0]}\n")
    return n_rejects
