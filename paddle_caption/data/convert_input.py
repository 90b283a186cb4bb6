"""Checks of the converter's input file and output directory, before any row is read: a file that
is not UTF-8 at all (UTF-16, GBK, compressed) is one clear error rather than a million rejects."""
from __future__ import annotations

import os
from pathlib import Path

from ..runtime import UserError


def check_input(path) -> tuple[Path, int]:
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            handle.read(1)
        size = path.stat().st_size
    except IsADirectoryError:
        raise UserError(f"cannot read input {path}: is a directory") from None
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror or err}") from None
    if size == 0:
        raise UserError(f"input {path} is empty")
    return path.resolve(), size


def sniff_utf8(path: Path, sample_bytes: int = 1 << 20) -> None:
    """Refuse a file that is not UTF-8 *at all* (UTF-16, GBK, compressed...); a few bad rows in a
    UTF-8 file are per-row rejects instead."""
    with open(path, "rb") as handle:
        head = handle.read(sample_bytes)
        at_eof = not handle.read(1)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise UserError(f"{path} is UTF-16 text, not UTF-8 (convert it, e.g. iconv -f UTF-16 -t UTF-8)")
    if head[:2] == b"\x1f\x8b":
        raise UserError(f"{path} is gzip-compressed; decompress it first")
    if head.count(b"\x00") > len(head) // 100:
        raise UserError(f"{path} is not UTF-8 text (it contains NUL bytes)")
    lines = head.split(b"\n")
    if not at_eof and len(lines) > 1:
        lines = lines[:-1]  # the sample cut the last row
    bad = 0
    for line in lines:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
    if bad * 2 > len(lines):
        raise UserError(f"{path} is not UTF-8 text ({bad} of the first {len(lines)} rows do not decode; "
                        f"convert it, e.g. iconv -f GBK -t UTF-8)")


def prepare_out_dir(out_dir) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output directory {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output directory {out_dir}: {err.strerror or err}") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"output directory {out_dir} is not writable")
    return out_dir
