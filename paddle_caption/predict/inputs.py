"""Reading TEST.tsv for prediction: one scan for ids and row positions, images read per batch.

The scan holds a few bytes per row (id, offset, length), never the images. A row whose id can be
read but which cannot be used — wrong column count, too long, or (when its batch is read) a bad
image — still gets a line in RESULTS.txt, with an empty caption and its reason in the rejects file:
one malformed row never costs a whole submission. A row whose id cannot be read, and a duplicate
id, are errors before anything is predicted: RESULTS.txt could not name them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..data.contest_tsv import RowError, TsvLine, iter_rows, read_line_at, parse_row
from ..data.images import DECODE_SIDE, MAX_COMPRESSION_RATIO, ImageRejected, b64decode_strict, decode_image
from ..runtime import UserError


@dataclass
class TestRow:
    index: int  # position in the (limited) input
    id: str
    line: TsvLine  # offset/length of the row (no data: the scan does not keep rows)
    reject: str = ""  # the row's reason when its layout is already wrong at the scan


def read_test_rows(path: str | os.PathLike, limit: int | None = None) -> list[TestRow]:
    """The rows of TEST.tsv in input order (blank lines skipped); see the module docstring."""
    rows: list[TestRow] = []
    first_line: dict[str, int] = {}
    for lineno, line, row in iter_rows(path, test=True, what="test file"):
        if limit is not None and len(rows) >= limit:
            break
        if isinstance(row, RowError) and not row.id_readable:
            raise UserError(f"{path}:{lineno}: cannot read the row's id ({row}), so no result line could name it")
        row_id = row.row_id if isinstance(row, RowError) else row.id
        if row_id in first_line:
            raise UserError(f"{path}:{lineno}: duplicate id {row_id!r} (first on line {first_line[row_id]})")
        first_line[row_id] = lineno
        rows.append(TestRow(len(rows), row_id, line, row.reason if isinstance(row, RowError) else ""))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def load_image(fd: int, row: TestRow, preprocess, *, max_pixels: int, min_side: int,
               decode_side: int = DECODE_SIDE, max_ratio: float = MAX_COMPRESSION_RATIO) -> np.ndarray:
    """Read one row back and return its preprocessed image (a large photo decoded at a reduced
    scale, `images.decode_image`), or raise ImageRejected."""
    try:
        parsed = parse_row(read_line_at(fd, row.line.offset, row.line.length), test=True)
    except RowError as err:  # the file changed since the scan
        raise ImageRejected(err.reason, err.detail) from None
    img = decode_image(b64decode_strict(parsed.image_b64), max_pixels=max_pixels, min_side=min_side,
                       decode_side=decode_side, max_ratio=max_ratio)
    return preprocess(img)


def load_batch(fd: int, batch: list[TestRow], preprocess, *, max_pixels: int, min_side: int,
               **limits) -> tuple[dict, dict]:
    """({id: preprocessed image}, {id: reject reason}) for the rows of one batch."""
    images, rejects = {}, {}
    for row in batch:
        if row.reject:
            rejects[row.id] = row.reject
            continue
        try:
            images[row.id] = load_image(fd, row, preprocess, max_pixels=max_pixels, min_side=min_side, **limits)
        except ImageRejected as err:
            rejects[row.id] = err.reason
    return images, rejects

