"""The cleaning rules of label conversion, as curation operations.

`tools/convert_labels.py` runs them as its default recipe (`data/clean_rules.default_recipe`, built
from the `CleanConfig` switches) on every row of a contest TSV; a curation recipe may list them too.
Each computes its statistic into the sample, then decides from it alone, and drops with a code of
`data/reject_reasons.REJECT_REASONS`:

- `empty_caption_filter`: `caption_chars`; drops `empty_caption`;
- `style_phrase_filter`: `style_phrase` (the first match of `pattern`, or None); drops `no_style_phrase`;
- `image_validity_filter`: `image_width` / `image_height` from the image, or `image_error`, the code
  of a payload that is no usable image (`bad_base64`, `empty_image`, `too_many_pixels`,
  `undecodable_image`); drops that code, else `image_too_small` below `min_side`;
- `duplicate_id_filter`: keeps the first sample of each id; drops `duplicate_id`;
- `caption_length_outlier_filter`: `caption_chars`; drops `caption_length_outlier` outside mean +-
  k * std (population std) of its input's caption lengths.

The converter checks a row before any record of it exists: its sample carries the image inline, as
`image_b64`, instead of a pointer into the TSV.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

from ...data.distribution import LengthHistogram
from ...data.images import MAX_COMPRESSION_RATIO, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, VERIFY_MODES, ImageRejected, b64decode_strict, probe_image
from ...data.stats import STYLE_PATTERN
from ...runtime import UserError
from ..samples import image_bytes
from .base import Op, register


@dataclass
class NoParams:
    """An operation without parameters (the recipe entry is `{name: {}}`)."""


@register
class EmptyCaptionFilter(Op):
    """Drops rows whose caption is empty or blank (`caption_chars`; `empty_caption`)."""

    name = "empty_caption_filter"
    Params = NoParams
    stat = "caption_chars"

    def compute_stats(self, sample):
        sample["stats"]["caption_chars"] = len(sample["caption"])

    def process(self, sample):
        return "empty_caption" if sample["stats"]["caption_chars"] == 0 else None


@dataclass
class StylePhraseParams:
    pattern: str = STYLE_PATTERN  # the contest solution's rule: a phrase ending in 风格

    def validate(self, where: str) -> None:
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise UserError(f"{where}: style_pattern {self.pattern!r} is not a valid regex: {err}") from None


@register
class StylePhraseFilter(Op):
    """Drops captions without a "…风格" style phrase (`style_phrase`; `no_style_phrase`)."""

    name = "style_phrase_filter"
    Params = StylePhraseParams

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.pattern = re.compile(params.pattern)

    def compute_stats(self, sample):
        match = self.pattern.search(sample["caption"])
        sample["stats"]["style_phrase"] = match.group(0) if match else None

    def process(self, sample):
        return "no_style_phrase" if sample["stats"]["style_phrase"] is None else None


@dataclass
class ImageValidityParams:
    verify: str = "fast"  # full | fast (JPEG checked at 1/8 scale) | header; see images.probe_image
    min_side: int = MIN_IMAGE_SIDE  # 0 disables
    max_pixels: int = MAX_IMAGE_PIXELS  # checked on the header; PIL's own bomb guard stays on above it
    max_compression_ratio: float = MAX_COMPRESSION_RATIO  # above 16.7 MP: RGB bytes per payload byte (a bomb)

    def validate(self, where: str) -> None:
        if self.max_compression_ratio <= 0:
            raise UserError(f"{where}: max_compression_ratio must be > 0, got {self.max_compression_ratio}")
        if self.verify not in VERIFY_MODES:
            raise UserError(f"{where}: verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")
        if self.min_side < 0:
            raise UserError(f"{where}: min_side must be >= 0, got {self.min_side}")
        if not 1 <= self.max_pixels <= Image.MAX_IMAGE_PIXELS:
            raise UserError(f"{where}: max_pixels must be in 1..{Image.MAX_IMAGE_PIXELS} (PIL's bomb limit), "
                            f"got {self.max_pixels}")


@register
class ImageValidityFilter(Op):
    """Drops payloads that are no usable image, or smaller than min_side (`image_error`, `image_width`/`image_height`)."""

    name = "image_validity_filter"
    Params = ImageValidityParams
    stat = "image_width"

    def compute_stats(self, sample):
        stats, p = sample["stats"], self.params
        try:
            data = b64decode_strict(sample["image_b64"]) if "image_b64" in sample else image_bytes(sample)
            # min_side is decided in `process`; the decode limit must be applied while decoding.
            stats["image_width"], stats["image_height"] = probe_image(data, max_pixels=p.max_pixels, min_side=0,
                                                                      verify=p.verify,
                                                                      max_ratio=p.max_compression_ratio)
        except ImageRejected as err:
            stats["image_error"] = err.reason

    def process(self, sample):
        stats = sample["stats"]
        if stats.get("image_error"):
            return stats["image_error"]
        if min(stats["image_width"], stats["image_height"]) < self.params.min_side:
            return "image_too_small"
        return None


@register
class DuplicateIdFilter(Op):
    """Keeps the first sample of each id; `process` remembers the ids it has kept, so a stream (the
    converter's rows, in input order) is decided one sample at a time."""

    name = "duplicate_id_filter"
    Params = NoParams

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.seen: set[str] = set()  # ~100 B per id: ~100 MB for 1M ids

    def process(self, sample):
        if sample["id"] in self.seen:
            return "duplicate_id"
        self.seen.add(sample["id"])
        return None


@dataclass
class KSigmaParams:
    k: float = 3.0

    def validate(self, where: str) -> None:
        if self.k <= 0:
            raise UserError(f"{where}: k must be > 0, got {self.k}")


@register
class CaptionLengthOutlierFilter(Op):
    """Drops captions whose length is outside mean +- k * std of the input's (`caption_length_outlier`)."""

    name = "caption_length_outlier_filter"
    Params = KSigmaParams
    stat = "caption_chars"

    def compute_stats(self, sample):
        sample["stats"]["caption_chars"] = len(sample["caption"])

    def prepare(self, read) -> None:
        self.lengths = LengthHistogram()  # exact on integers: mean and std do not drift with the row count
        for sample in read():
            self.lengths.add(sample["stats"]["caption_chars"])
        self.bounds = self.lengths.ksigma_bounds(self.params.k)
        self.info = {"k": self.params.k, "low": self.bounds[0], "high": self.bounds[1], "n": self.lengths.n}

    def process(self, sample):
        low, high = self.bounds
        return None if low <= sample["stats"]["caption_chars"] <= high else "caption_length_outlier"
