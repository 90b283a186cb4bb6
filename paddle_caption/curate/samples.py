"""The sample that flows through a curation recipe, and its files.

A sample is a records.jsonl record (`paddle_caption.data.records`: id, caption, and a pointer to its
image row in a contest-layout TSV) plus what curation adds:

    {"id", "caption", "tsv", "offset", "length", "width", "height",
     "stats": {name: value},       # what the operations computed (data-juicer's `__dj__stats__`)
     "synthetic": bool,            # caption written by a model (pseudo-label, re-caption)
     "copy": int}                  # 0 for the row itself, k for its k-th repeat (repeat op)

A stage's samples live in a JSON-lines file and are always streamed (`iter_samples`), never held as a
list: memory does not grow with the number of rows.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Iterator

import orjson

from ..data.images import decode_image
from ..data.records import RECORD_KEYS, iter_records, read_image_bytes
from ..files import iter_text_lines, json_line, write_lines
from ..runtime import UserError


def new_sample(record: dict, *, synthetic: bool = False) -> dict:
    sample = {k: record[k] for k in RECORD_KEYS}
    sample["stats"] = dict(record.get("stats") or {})
    sample["synthetic"] = bool(record.get("synthetic", synthetic))
    sample["copy"] = int(record.get("copy", 0))
    return sample


def dump_sample(sample: dict) -> str:
    return json_line(sample)


def iter_samples(path: str | os.PathLike) -> Iterator[dict]:
    """The samples of a stage file, one at a time."""
    for where, line in iter_text_lines(path, "samples"):
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            raise UserError(f"{where}: corrupt sample line") from None


def iter_record_samples(path: str | os.PathLike) -> Iterator[dict]:
    """Samples from a records.jsonl (the converter's output, or a previous curation's)."""
    return map(new_sample, iter_records(path))


def write_samples(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    return write_lines(path, map(dump_sample, samples))


def image_bytes(sample: dict) -> bytes:
    return read_image_bytes(sample)


def load_image(sample: dict):
    """The sample's image as an RGB PIL image (rows were verified when they were converted)."""
    return decode_image(image_bytes(sample), verify=False)


def image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(data)).size


def count_samples(path: str | os.PathLike) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


