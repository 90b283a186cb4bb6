"""Filters on image shape, aspect ratio and file size, and on caption length (characters, jieba words).

Every bound is fixed or computed on the op's input (thresholds.py): e.g. `{"caption_length_filter":
{"unit": "words", "min": {"percentile": 1}, "max": {"mean_std": 3}}}`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...runtime import UserError
from ...text import jieba_words
from ..samples import image_bytes
from ..thresholds import check_bound
from .base import RangeFilter, RangeParams, register


@dataclass
class ImageShapeParams:
    min_width: object = None
    max_width: object = None
    min_height: object = None
    max_height: object = None

    def validate(self, where: str) -> None:
        for name in ("min_width", "max_width", "min_height", "max_height"):
            check_bound(getattr(self, name), f"{where}: {name}")


@register
class ImageShapeFilter(RangeFilter):
    """Image width and height in pixels (from the record, read when the row was converted)."""

    name = "image_shape_filter"
    Params = ImageShapeParams
    stat = "image_width"

    def ranges(self):
        p = self.params
        return [("image_width", p.min_width, p.max_width), ("image_height", p.min_height, p.max_height)]

    def compute_stats(self, sample):
        sample["stats"]["image_width"] = int(sample["width"])
        sample["stats"]["image_height"] = int(sample["height"])


@register
class ImageAspectRatioFilter(RangeFilter):
    """Width / height."""

    name = "image_aspect_ratio_filter"
    Params = RangeParams
    stat = "aspect_ratio"

    def compute_stats(self, sample):
        sample["stats"]["aspect_ratio"] = round(sample["width"] / max(1, sample["height"]), 6)


@register
class ImageFileSizeFilter(RangeFilter):
    """The image file's size in bytes (the decoded base64 payload)."""

    name = "image_file_size_filter"
    Params = RangeParams
    stat = "image_bytes"

    def compute_stats(self, sample):
        if "image_bytes" not in sample["stats"]:
            sample["stats"]["image_bytes"] = len(image_bytes(sample))


@dataclass
class CaptionLengthParams(RangeParams):
    unit: str = "chars"  # chars | words (jieba)

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.unit not in ("chars", "words"):
            raise UserError(f"{where}: unit must be chars or words, not {self.unit!r}")


@register
class CaptionLengthFilter(RangeFilter):
    """Caption length in characters or in jieba words (the unit the contest's metrics count)."""

    name = "caption_length_filter"
    Params = CaptionLengthParams

    @property
    def stat(self):
        return "caption_words" if self.params.unit == "words" else "caption_chars"

    def compute_stats(self, sample):
        caption = sample["caption"]
        sample["stats"][self.stat] = len(jieba_words(caption)) if self.params.unit == "words" else len(caption)
