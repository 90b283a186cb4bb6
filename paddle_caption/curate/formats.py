"""data-juicer's multimodal jsonl, out and in, so data-juicer operations can run between two kit steps.

One line per image-text pair, data-juicer's default special tokens:

    {"id": "train_000001", "images": ["images/train_000001.jpg"],
     "text": "<__dj__image> 卡通风格。图片中间是一个红色的圆形，背景是白色。 <|__dj__eoc|>",
     "__dj__stats__": {"consistency": 0.61, ...}}

Export writes the images as files beside the jsonl (paths relative to it) and the kit's numeric
statistics under data-juicer's stats key. Import reads such a file back (also with `<image>` as the
image token; image paths relative to the jsonl or absolute): the images are packed into an
`images.tsv` (`id \\t base64`) in the run's work directory, which the samples point into, so
everything after it (training included) reads images the usual way.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path
from typing import Iterator

from ..data.images import ImageRejected, probe_image
from ..data.records import new_record
from ..files import atomic_write
from ..runtime import UserError
from .samples import image_bytes, iter_samples, new_sample

IMAGE_TOKEN = "<__dj__image>"
EOC_TOKEN = "<|__dj__eoc|>"
STATS_KEY = "__dj__stats__"
_TOKENS = re.compile(r"<__dj__image>|<image>|<\|__dj__eoc\|>")


def _extension(data: bytes) -> str:
    from PIL import Image

    fmt = (Image.open(io.BytesIO(data)).format or "bin").lower()
    return {"jpeg": "jpg"}.get(fmt, fmt)


def export_data_juicer(samples_path: Path, out_dir: Path) -> Path:
    """`out_dir/data_juicer.jsonl` and `out_dir/images/`; returns the jsonl's path."""
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    path = out_dir / "data_juicer.jsonl"
    written: dict[tuple, str] = {}
    with atomic_write(path) as out:
        for sample in iter_samples(samples_path):
            key = (sample["tsv"], sample["offset"])
            if key not in written:  # one file per image row, shared by its references and copies
                data = image_bytes(sample)
                name = f"{len(written):08d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', sample['id'])[:80]}.{_extension(data)}"
                with atomic_write(images / name, "wb") as handle:
                    handle.write(data)
                written[key] = f"images/{name}"
            stats = {k: v for k, v in sample["stats"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            row = {"id": sample["id"], "images": [written[key]],
                   "text": f"{IMAGE_TOKEN} {sample['caption']} {EOC_TOKEN}", STATS_KEY: stats}
            if sample.get("synthetic"):
                row["synthetic"] = True
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def import_data_juicer(path: str | os.PathLike, work_dir: Path) -> Iterator[dict]:
    """Samples from a data-juicer jsonl; images packed into work_dir/images.tsv."""
    path = Path(path)
    work_dir.mkdir(parents=True, exist_ok=True)
    tsv = (work_dir / "images.tsv").resolve()
    samples = []
    offset = 0
    with open(path, encoding="utf-8") as handle, atomic_write(tsv, "wb") as out:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not JSON ({err.msg})") from None
            images, text = row.get("images"), row.get("text")
            if not (isinstance(images, list) and len(images) == 1 and isinstance(images[0], str)):
                raise UserError(f"{where}: expected exactly one image path in 'images'")
            if not isinstance(text, str):
                raise UserError(f"{where}: 'text' missing or not a string")
            image_path = Path(images[0]) if Path(images[0]).is_absolute() else path.parent / images[0]
            try:
                data = image_path.read_bytes()
                width, height = probe_image(data)
            except OSError as err:
                raise UserError(f"{where}: cannot read image {image_path}: {err.strerror or err}") from None
            except ImageRejected as err:
                raise UserError(f"{where}: image {image_path}: {err}") from None
            row_id = str(row.get("id", f"dj_{lineno:08d}"))
            if "\t" in row_id or "\n" in row_id or not row_id.strip():
                raise UserError(f"{where}: id {row_id!r} is empty or holds a tab or line break")
            line_bytes = f"{row_id}\t".encode("utf-8") + base64.b64encode(data)
            out.write(line_bytes + b"\n")
            stats = row.get(STATS_KEY) if isinstance(row.get(STATS_KEY), dict) else {}
            record = new_record(row_id, " ".join(_TOKENS.sub(" ", text).split()), str(tsv), offset,
                                len(line_bytes), width, height)
            samples.append(new_sample({**record, "stats": stats, "synthetic": bool(row.get("synthetic"))}))
            offset += len(line_bytes) + 1
    return iter(samples)
