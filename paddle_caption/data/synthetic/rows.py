"""The rows of a split: ids, the per-row seeds, and the planned dirty and noisy training rows.

Dirty rows (~8% of the training split) give the cleaning step work; noisy rows (off by default;
docs/synthetic_ads.md, "Noise") give curation work. Both are planned up front from (seed, split),
never from the order rows are rendered in, so the output does not depend on the worker count.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ...runtime import UserError
from .render import MIN_SIDE, render_ad
from .world import COLOURS, LINE_ART, STYLES, CaptionFields, format_caption, sample_fields

DIRTY_FRACTION = 0.08
DIRTY_KINDS = ["no_style", "empty_caption", "bad_image", "duplicate_id", "missing_column"]
SPLITS = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}  # split -> code mixed into the per-row seed

# Noise (docs/synthetic_ads.md, "Noise"): kinds in planning order.
NOISE_KINDS = ["mismatched_caption", "wrong_style", "wrong_colour", "truncated_caption", "near_duplicate_image"]
TRUNCATE_RANGE = (0.3, 0.8)  # a truncated caption keeps this share of its characters
NEAR_DUPLICATE_SCALE = (0.96, 1.04)  # per side
NEAR_DUPLICATE_QUALITY = (75, 85)  # re-encoded JPEG quality



@dataclass
class NoiseConfig:
    """Shares of the clean training rows made noisy (0 = none), and the unlabeled pool's size."""

    mismatched: float = 0.0  # caption of another training image
    wrong_word: float = 0.0  # one style or colour word replaced (half each; line-art rows excluded)
    truncated: float = 0.0  # caption cut short
    near_duplicate: float = 0.0  # a slightly rescaled, re-encoded copy of an earlier clean row's image
    unlabeled: int = 0  # images in unlabeled.tsv (id \t base64), references in unlabeled_refs.tsv

    def validate(self) -> None:
        shares = (self.mismatched, self.wrong_word, self.truncated, self.near_duplicate)
        if min(shares) < 0 or sum(shares) > 0.9:
            raise UserError(f"noise shares must be >= 0 and sum to at most 0.9, got {shares}")
        if self.unlabeled < 0:
            raise UserError(f"--unlabeled must be >= 0, got {self.unlabeled}")

    @property
    def any(self) -> bool:
        return bool(self.mismatched or self.wrong_word or self.truncated or self.near_duplicate)


@dataclass
class SyntheticRow:
    id: str
    image_b64: str | None  # None: the column was dropped (a missing-column dirty row)
    caption: str | None  # the reference caption (also kept for test rows, for test_refs.tsv)
    dirty: str | None = None  # one of DIRTY_KINDS, or None for a clean row
    noise: str | None = None  # one of NOISE_KINDS, or None
    noise_detail: str = ""  # the true caption, or the row the caption / image came from

    def line(self) -> str:
        """Contest row `id \\t base64 \\t caption`; a dropped column is simply absent."""
        return "\t".join(c for c in (self.id, self.image_b64, self.caption) if c is not None)


def row_id(split: str, index: int) -> str:
    return f"{split}_{index + 1:06d}"


def plan_dirty_rows(seed: int, n: int) -> dict[int, str]:
    """Which training rows are dirty, and how: round(8% of n) rows, the kinds as even as possible.

    Row 0 is never dirty, so every duplicated id has an earlier row to copy.
    """
    count = min(int(n * DIRTY_FRACTION + 0.5), max(n - 1, 0))
    if count == 0:
        return {}
    rng = np.random.default_rng([seed, SPLITS["train"], 1 << 20])
    positions = np.sort(rng.choice(np.arange(1, n), size=count, replace=False))
    kinds = rng.permutation(np.arange(count) % len(DIRTY_KINDS))
    return {int(i): DIRTY_KINDS[k] for i, k in zip(positions, kinds)}


def row_fields(seed: int, split: str, index: int) -> CaptionFields:
    """The fields of a row (its RNG's first draws), without rendering it."""
    return sample_fields(np.random.default_rng([seed, SPLITS[split], index]))


def plan_noise_rows(seed: int, n: int, dirty: dict[int, str], cfg: NoiseConfig) -> dict[int, tuple[str, int]]:
    """Which clean training rows are noisy: {index: (kind, donor index)}; the donor is the row whose
    caption (mismatched) or image (near duplicate) the noisy row takes, else -1.

    Counts are round(share * n); rows are drawn among the clean rows (row 0 excluded), wrong-word
    rows among those not in line art (whose captions name no colour), donors among the rows that
    stay clean, a mismatched donor always with a different caption.
    """
    if not cfg.any:
        return {}
    rng = np.random.default_rng([seed, SPLITS["train"], 2 << 20])
    fields = {i: row_fields(seed, "train", i) for i in range(n) if i not in dirty}
    free = [i for i in range(1, n) if i not in dirty]
    order = list(rng.permutation(free))
    plan: dict[int, tuple[str, int]] = {}
    wanted = {"mismatched_caption": cfg.mismatched, "wrong_style": cfg.wrong_word / 2,
              "wrong_colour": cfg.wrong_word / 2, "truncated_caption": cfg.truncated,
              "near_duplicate_image": cfg.near_duplicate}
    for kind in NOISE_KINDS:
        count = int(n * wanted[kind] + 0.5)
        pool = [i for i in order if i not in plan
                and not (kind in ("wrong_style", "wrong_colour") and fields[i].style == LINE_ART)]
        for i in pool[:count]:
            plan[int(i)] = (kind, -1)
    clean = [i for i in range(n) if i not in dirty and i not in plan]
    if not clean:
        raise UserError("noise shares leave no clean training row to take captions or images from")
    for i, (kind, _) in sorted(plan.items()):
        if kind == "near_duplicate_image":
            earlier = [j for j in clean if j < i] or clean
            plan[i] = (kind, int(earlier[rng.integers(len(earlier))]))
        elif kind == "mismatched_caption":
            own = format_caption(fields[i])
            others = [j for j in clean if format_caption(fields[j]) != own]
            plan[i] = (kind, int(others[rng.integers(len(others))]) if others else -1)
    return plan


def make_noisy(row: SyntheticRow, fields: CaptionFields, rng: np.random.Generator, seed: int, donor: int) -> None:
    """Give a rendered clean row the noise its plan names; `noise_detail` records the truth."""
    kind = row.noise
    if kind == "mismatched_caption":
        row.noise_detail = row.caption
        row.caption = format_caption(row_fields(seed, "train", donor))
    elif kind == "wrong_style":
        row.noise_detail = row.caption
        others = [s for s in STYLES if s not in (fields.style, LINE_ART)]
        row.caption = format_caption(CaptionFields(others[rng.integers(len(others))], fields.background,
                                                   fields.objects))
    elif kind == "wrong_colour":
        row.noise_detail = row.caption
        k = int(rng.integers(len(fields.objects)))
        colour, shape = fields.objects[k]
        others = [c for c in COLOURS if c != colour]
        objects = list(fields.objects)
        objects[k] = (others[rng.integers(len(others))], shape)
        row.caption = format_caption(CaptionFields(fields.style, fields.background, objects))
    elif kind == "truncated_caption":
        row.noise_detail = row.caption
        row.caption = row.caption[: max(1, int(len(row.caption) * rng.uniform(*TRUNCATE_RANGE)))]
    elif kind == "near_duplicate_image":
        donor_rng = np.random.default_rng([seed, SPLITS["train"], donor])
        donor_fields = sample_fields(donor_rng)
        img = render_ad(donor_fields, donor_rng)
        size = tuple(max(MIN_SIDE // 2, round(v * rng.uniform(*NEAR_DUPLICATE_SCALE))) for v in img.size)
        buf = io.BytesIO()
        img.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=int(rng.integers(*NEAR_DUPLICATE_QUALITY)))
        row.image_b64 = base64.b64encode(buf.getvalue()).decode("ascii")
        row.caption = format_caption(donor_fields)
        row.noise_detail = row_id("train", donor)


def make_dirty(row: SyntheticRow, jpeg: bytes, rng: np.random.Generator) -> None:
    """Spoil a rendered row in the way `row.dirty` names (the id is handled by the planner)."""
    kind = row.dirty
    if kind == "no_style":
        rest = row.caption.split("。", 1)[1]
        stem = row.caption.split("风格", 1)[0]
        # Either the style sentence is gone, or the style word lost its 风格 suffix.
        row.caption = rest if rng.random() < 0.5 else f"{stem}。{rest}"
    elif kind == "empty_caption":
        row.caption = ""
    elif kind == "bad_image":
        variant = int(rng.integers(3))
        if variant == 0:  # valid base64 of a JPEG cut short: decodes as base64, not as an image
            row.image_b64 = base64.b64encode(jpeg[: int(len(jpeg) * rng.uniform(0.2, 0.8))]).decode("ascii")
        elif variant == 1:  # the base64 text itself cut mid-quantum: not even valid base64
            cut = 4 * int(len(row.image_b64) * rng.uniform(0.2, 0.8) / 4) + 2
            row.image_b64 = row.image_b64[:cut]
        else:  # well-formed base64 of bytes that are no image at all
            junk = b"<html>not an image</html>" + rng.bytes(int(rng.integers(16, 512)))
            row.image_b64 = base64.b64encode(junk).decode("ascii")
    elif kind == "missing_column":
        if rng.random() < 0.5:
            row.caption = None
        else:
            row.image_b64 = None
