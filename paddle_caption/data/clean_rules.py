"""The cleaning rules of label conversion: what makes a contest row unusable, and why.

`check_row` decides one row; `REASONS` lists the ledger codes in the order rows are checked (the
first failing check is a row's reason). The row-structure checks (length, UTF-8, three columns,
non-empty id) belong to the row layout (`contest_tsv.parse_row`) and are always on; the others are
`CleanConfig` switches, settable by flag or by a JSON `--config` file of its fields. Duplicate ids and
the caption-length filter need the whole file and are applied by the converter (`convert.py`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass

from PIL import Image

from ..files import read_json_object
from ..runtime import UserError
from ..typed_config import from_mapping
from .contest_tsv import DEFAULT_MAX_ROW_BYTES, RowError, parse_row
from .images import VERIFY_MODES, ImageRejected, b64decode_strict, probe_image
from .stats import STYLE_PATTERN

# Reject reasons in the order rows are checked.
REASONS = {
    "row_too_long": "row longer than --max-row-bytes (never read into memory)",
    "invalid_utf8": "row is not valid UTF-8",
    "wrong_column_count": "row does not have exactly three tab-separated columns",
    "empty_id": "id column is empty",
    "empty_caption": "caption is empty",
    "no_style_phrase": "caption has no phrase matching the style pattern (default \\S+风格)",
    "bad_base64": "image column is not strict base64",
    "empty_image": "image column is empty",
    "too_many_pixels": "image has more than --max-pixels pixels (read from the header; never decoded)",
    "undecodable_image": "payload is not an image PIL can decode completely",
    "image_too_small": "image side shorter than --min-side",
    "duplicate_id": "id of an earlier kept row (the first one is kept)",
    "no_reference": "image without a caption in --captions (MUGE layout)",
    "caption_length_outlier": "caption length outside mean +- K*std of kept captions (--ksigma)",
}


@dataclass
class CleanConfig:
    """Cleaning rules; also the keys accepted in a `--config` JSON file."""

    require_style: bool = True  # reject captions without a style phrase (the contest solution's rule)
    style_pattern: str = STYLE_PATTERN
    drop_empty_caption: bool = True
    dedup_ids: bool = True  # reject rows whose id was already kept
    verify: str = "fast"  # full | fast (JPEG checked at 1/8 scale) | header; see images.probe_image
    min_side: int = 32  # reject images with a side below this; 0 disables
    max_pixels: int = 4096 * 4096  # bounds decode memory; PIL's own bomb guard stays on above it
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
    ksigma: float = 0.0  # 0 disables the caption-length outlier filter
    val_fraction: float = 0.0  # share of kept rows routed to val_records.jsonl
    # MUGE ECommerce-IC layout: the TSV has `image_id \t base64` rows and the captions come from
    # this IC_*.jsonl; every reference becomes a training record (at most references_per_image; 0: all).
    captions: str = ""
    references_per_image: int = 0

    def validate(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise UserError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")
        try:
            re.compile(self.style_pattern)
        except re.error as err:
            raise UserError(f"style_pattern {self.style_pattern!r} is not a valid regex: {err}") from None
        if self.min_side < 0:
            raise UserError(f"min_side must be >= 0, got {self.min_side}")
        if not 1 <= self.max_pixels <= Image.MAX_IMAGE_PIXELS:
            raise UserError(f"max_pixels must be in 1..{Image.MAX_IMAGE_PIXELS} (PIL's bomb limit), "
                            f"got {self.max_pixels}")
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


def check_caption(caption: str, cfg: CleanConfig, style_re: re.Pattern) -> str | None:
    """The caption rules: a reason, or None."""
    if cfg.drop_empty_caption and not caption:
        return "empty_caption"
    if cfg.require_style and not style_re.search(caption):
        return "no_style_phrase"
    return None


def check_row(data: bytes, cfg: CleanConfig, style_re: re.Pattern) -> tuple:
    """(reason or None, id, caption, width, height) for one row's bytes. With `cfg.captions` (the
    MUGE layout) the row is `image_id \\t base64` and only the image is checked here: its captions
    are checked one by one by the converter (`check_caption`)."""
    muge = bool(cfg.captions)
    try:
        row = parse_row(data, test=muge)
    except RowError as err:
        return err.reason, err.row_id, "", 0, 0
    caption = row.caption or ""
    reason = None if muge else check_caption(caption, cfg, style_re)
    if reason:
        return reason, row.id, caption, 0, 0
    try:
        width, height = probe_image(b64decode_strict(row.image_b64), max_pixels=cfg.max_pixels,
                                    min_side=cfg.min_side, verify=cfg.verify)
    except ImageRejected as err:
        return err.reason, row.id, caption, 0, 0
    return None, row.id, caption, width, height
