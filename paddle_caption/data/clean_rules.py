"""The cleaning rules of label conversion: which checks run on a contest row, in which order.

The checks themselves are curation operations (`paddle_caption.curate.ops.cleaning`: one filter
system for conversion and curation); `CleanConfig` holds their switches, settable by flag or by a
JSON `--config` file of its fields, and `default_recipe` turns it into the recipe the converter
runs. A row's reason is its first failing check, in the order of `REJECT_REASONS`
(`reject_reasons.py`). The row-structure checks (length, UTF-8, three columns, non-empty id) belong
to the row layout (`contest_tsv.parse_row`) and are always on; the row operations run in the
converter's workers (`check_row`); duplicate ids and caption-length outliers need the whole file and
are applied by the converter (`convert.py`) with the recipe's `duplicate_id_filter` and
`caption_length_outlier_filter`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..curate.ops import OpContext, build_op
from ..curate.ops.cleaning import ImageValidityParams, StylePhraseParams
from ..files import read_json_object
from ..runtime import UserError
from ..typed_config import from_mapping
from .contest_tsv import DEFAULT_MAX_ROW_BYTES, RowError, parse_row
from .images import MAX_COMPRESSION_RATIO, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE
from .stats import STYLE_PATTERN

CAPTION_OPS = ("empty_caption_filter", "style_phrase_filter")
ROW_OPS = CAPTION_OPS + ("image_validity_filter",)  # decided row by row, in the workers, in this order


@dataclass
class CleanConfig:
    """Cleaning rules; also the keys accepted in a `--config` JSON file."""

    require_style: bool = True  # reject captions without a style phrase (the contest solution's rule)
    style_pattern: str = STYLE_PATTERN
    drop_empty_caption: bool = True
    dedup_ids: bool = True  # reject rows whose id was already kept
    verify: str = "fast"  # full | fast (JPEG checked at 1/8 scale) | header; see images.probe_image
    min_side: int = MIN_IMAGE_SIDE  # reject images with a side below this; 0 disables
    max_pixels: int = MAX_IMAGE_PIXELS  # a decompression bomb above (header); PIL's own bomb guard stays on
    max_compression_ratio: float = MAX_COMPRESSION_RATIO  # above 16.7 MP: RGB bytes per payload byte (a bomb)
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    ksigma: float = 0.0  # 0 disables the caption-length outlier filter
    val_fraction: float = 0.0  # share of kept rows routed to val_records.jsonl
    # MUGE ECommerce-IC layout: the TSV has `image_id \t base64` rows and the captions come from
    # this IC_*.jsonl; every reference becomes a training record (at most references_per_image; 0: all).
    captions: str = ""
    references_per_image: int = 0

    def validate(self) -> None:
        # The operations' own checks, so a bad value reads the same from a flag and from a recipe.
        StylePhraseParams(self.style_pattern).validate("config")
        ImageValidityParams(self.verify, self.min_side, self.max_pixels, self.max_compression_ratio).validate("config")
        if self.max_row_bytes < 1:
            raise UserError(f"max_row_bytes must be >= 1, got {self.max_row_bytes}")
        if self.ksigma < 0:
            raise UserError(f"ksigma must be >= 0, got {self.ksigma}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.references_per_image < 0:
            raise UserError(f"references_per_image must be >= 0, got {self.references_per_image}")

    def update_from_file(self, path: str | os.PathLike) -> "CleanConfig":
        """Set the fields a JSON file names (unknown keys and wrong types are errors)."""
        updated = from_mapping(CleanConfig, read_json_object(path, "config"), f"config {path}", base=self)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(updated, f.name))
        return self


def is_val(record_id: str, fraction: float) -> bool:
    """Stable split: the first 8 bytes of sha1(id) as a fraction of 2**64."""
    if fraction <= 0:
        return False
    digest = hashlib.sha1(record_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def default_recipe(cfg: CleanConfig) -> list[dict]:
    """The converter's recipe: the switched-on checks as curation operations, in check order."""
    recipe = []
    if cfg.drop_empty_caption:
        recipe.append({"empty_caption_filter": {}})
    if cfg.require_style:
        recipe.append({"style_phrase_filter": {"pattern": cfg.style_pattern}})
    recipe.append({"image_validity_filter": {"verify": cfg.verify, "min_side": cfg.min_side,
                                             "max_pixels": cfg.max_pixels,
                                             "max_compression_ratio": cfg.max_compression_ratio}})
    if cfg.dedup_ids:
        recipe.append({"duplicate_id_filter": {}})
    if cfg.ksigma > 0:
        recipe.append({"caption_length_outlier_filter": {"k": cfg.ksigma}})
    return recipe


def build_recipe(cfg: CleanConfig, work_dir: str | os.PathLike = ".") -> dict:
    """{op name: operation} of `default_recipe(cfg)`, in check order."""
    ctx = OpContext(work_dir=Path(work_dir))
    ops = [build_op(entry, ctx, f"cleaning recipe[{i}]") for i, entry in enumerate(default_recipe(cfg))]
    return {op.name: op for op in ops}


def first_reason(ops, sample: dict) -> str | None:
    """Compute and decide op by op: the first failing check is the reason, and nothing after it is
    computed (no image is decoded for a row whose caption already failed)."""
    for op in ops:
        op.compute_stats(sample)
        reason = op.process(sample)
        if reason:
            return reason
    return None


def check_caption(caption: str, ops: dict) -> str | None:
    """The caption rules of the recipe: a reason, or None."""
    return first_reason([ops[name] for name in CAPTION_OPS if name in ops], {"caption": caption, "stats": {}})


def check_row(data: bytes, ops: dict, muge: bool = False) -> tuple:
    """(reason or None, id, caption, width, height) for one row's bytes, by the recipe's row
    operations. In the MUGE layout (`muge`) the row is `image_id \t base64` and only the image is
    checked here: its captions are checked one by one by the converter (`check_caption`)."""
    try:
        row = parse_row(data, test=muge)
    except RowError as err:
        return err.reason, err.row_id, "", 0, 0
    caption = row.caption or ""
    sample = {"id": row.id, "caption": caption, "image_b64": row.image_b64, "stats": {}}
    names = ROW_OPS[len(CAPTION_OPS):] if muge else ROW_OPS
    reason = first_reason([ops[name] for name in names if name in ops], sample)
    if reason:
        return reason, row.id, caption, 0, 0
    return None, row.id, caption, sample["stats"]["image_width"], sample["stats"]["image_height"]
