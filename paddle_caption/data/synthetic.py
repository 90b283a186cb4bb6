"""The synthetic ad-image world (spec v1: "Synthetic ad-image world", synthetic_ads.md).

Every image is a flat background with one or two coloured shapes drawn in one of six styles, and its
caption names exactly those fields, so a model trained on it can be scored field by field. The
generator writes contest-format TSV splits; the training split also gets ~8% deliberately dirty rows
so that the cleaning step has work to do.

Noise (optional, off by default; the project copy of the spec, docs/synthetic_ads.md, "Noise"): for data curation, a share of
the clean training rows can carry a caption of another image, a wrong style or colour word, a
truncated caption, or a near-duplicate of an earlier row's image; and an unlabeled pool of images
can be written. Which rows are noisy, and how, goes to `train_noise.tsv` (the ground truth for a
filter's precision and recall), never into the training files.

Determinism: each row draws from its own RNG seeded by (seed, split, index), and the dirty and noisy
rows are planned up front from (seed, split), so the files are byte-identical for the same seed,
counts and noise shares whatever the number of worker processes.
"""
from __future__ import annotations

import argparse
import base64
import io
import math
import multiprocessing as mp
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..files import atomic_write
from ..runtime import UserError, cpu_count

# ---------------------------------------------------------------------------------------------
# The world's vocabulary (spec tables; order matters only for sampling)

STYLES = ["卡通风格", "写实风格", "像素风格", "水彩风格", "黑白简笔风格", "3D风格"]
SHAPES = ["圆形", "正方形", "三角形", "五角星", "菱形"]
COLOURS = {
    "红色": (220, 40, 40),
    "绿色": (40, 170, 60),
    "蓝色": (40, 80, 220),
    "黄色": (240, 200, 30),
    "紫色": (140, 60, 180),
    "橙色": (245, 130, 30),
}
BACKGROUNDS = {
    "白色": (245, 245, 245),
    "黑色": (25, 25, 25),
    "灰色": (128, 128, 128),
    "米色": (235, 222, 185),
}
LINE_ART = "黑白简笔风格"  # the one style whose objects have no colour and whose background is white
LINE_ART_BACKGROUND = "白色"

# Canvas and layout numbers fixed by the spec.
MIN_SIDE, MAX_SIDE = 320, 640
ONE_OBJECT_SIZE = (0.35, 0.50)  # bounding-box side as a fraction of min(width, height)
TWO_OBJECT_SIZE = (0.25, 0.35)
ONE_OBJECT_JITTER = 0.10  # fraction of the width (x) / height (y)
TWO_OBJECT_CENTRES = (0.25, 0.75)
TWO_OBJECT_JITTER = 0.05  # x, fraction of the width; y uses ONE_OBJECT_JITTER of the height
CARTOON_OUTLINE = 0.04  # of the object size
LINE_ART_OUTLINE = 0.03
SHADOW_OFFSET = 0.04
EXTRUDE_OFFSET = 0.06
PIXEL_FACTOR = 16
WATERCOLOUR_BLUR = 0.015  # of min(width, height)
WATERCOLOUR_NOISE = 12
JPEG_QUALITY = 90

# Our own choices where the spec only says "soft grey shadow" / leaves anti-aliasing open.
SHADOW_GREY = (90, 90, 90)
SHADOW_OPACITY = 0.45
SHADOW_BLUR = 0.03  # of the object size
OUTLINE_COLOUR = (0, 0, 0)
SUPERSAMPLE = 4  # object masks are drawn this many times larger, then box-averaged down

DIRTY_FRACTION = 0.08
DIRTY_KINDS = ["no_style", "empty_caption", "bad_image", "duplicate_id", "missing_column"]
SPLITS = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}  # split -> code mixed into the per-row seed

# Noise (docs/synthetic_ads.md, "Noise"): kinds in planning order.
NOISE_KINDS = ["mismatched_caption", "wrong_style", "wrong_colour", "truncated_caption", "near_duplicate_image"]
TRUNCATE_RANGE = (0.3, 0.8)  # a truncated caption keeps this share of its characters
NEAR_DUPLICATE_SCALE = (0.96, 1.04)  # per side
NEAR_DUPLICATE_QUALITY = (75, 85)  # re-encoded JPEG quality

# ---------------------------------------------------------------------------------------------
# Captions


@dataclass
class CaptionFields:
    style: str
    background: str
    objects: list[tuple[str | None, str]]  # (colour or None for 黑白简笔风格, shape); [centre] or [left, right]


def _alternation(words) -> str:
    # Longest first, so that no word can match as the prefix of another.
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJ = rf"(?:({_alternation(COLOURS)})的)?({_alternation(SHAPES)})"
_CAPTION_RE = re.compile(
    rf"({_alternation(STYLES)})。图片(?:中间是一个{_OBJ}|左边是一个{_OBJ}，右边是一个{_OBJ})"
    rf"，背景是({_alternation(BACKGROUNDS)})。"
)


def parse_caption(text: str) -> CaptionFields | None:
    """Parse a caption that follows the grammar exactly; None for anything else (never raises).

    Colour words must be present for every style but 黑白简笔风格 and absent for it. The background
    is not forced to 白色 for line art here: that is a drawing rule, and a wrong background in a
    predicted caption should score as a wrong field, not as an unparseable caption.
    """
    if not isinstance(text, str):
        return None
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        return None
    style, c0, s0, c1, s1, c2, s2, background = m.groups()
    objects = [(c0, s0)] if s0 is not None else [(c1, s1), (c2, s2)]
    if any((colour is None) != (style == LINE_ART) for colour, _ in objects):
        return None
    return CaptionFields(style=style, background=background, objects=objects)


def _check_fields(fields: CaptionFields) -> None:
    if fields.style not in STYLES:
        raise ValueError(f"unknown style {fields.style!r}")
    if fields.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {fields.background!r}")
    if len(fields.objects) not in (1, 2):
        raise ValueError(f"need 1 or 2 objects, got {len(fields.objects)}")
    for colour, shape in fields.objects:
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}")
        if fields.style == LINE_ART and colour is not None:
            raise ValueError(f"{LINE_ART} objects have no colour, got {colour!r}")
        if fields.style != LINE_ART and colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}")


def format_caption(fields: CaptionFields) -> str:
    """The caption for `fields` (inverse of parse_caption); ValueError on fields outside the world."""
    _check_fields(fields)
    described = [f"一个{colour}的{shape}" if colour else f"一个{shape}" for colour, shape in fields.objects]
    if len(described) == 1:
        subjects = f"中间是{described[0]}"
    else:
        subjects = f"左边是{described[0]}，右边是{described[1]}"
    return f"{fields.style}。图片{subjects}，背景是{fields.background}。"


def sample_fields(rng: np.random.Generator) -> CaptionFields:
    """Uniform style, object count, shapes and colours; line art gets a white background, no colours."""
    style = STYLES[rng.integers(len(STYLES))]
    n_objects = 1 + int(rng.integers(2))
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    objects = []
    for _ in range(n_objects):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        objects.append((None if style == LINE_ART else colour, shape))
    if style == LINE_ART:
        background = LINE_ART_BACKGROUND
    return CaptionFields(style=style, background=background, objects=objects)


# ---------------------------------------------------------------------------------------------
# Geometry: every shape is placed by the centre and side `s` of its (largest) bounding-box side.
# `inset` shrinks the shape so that each edge moves inwards by that many pixels; for these regular
# shapes that is a scaling about the incentre, which gives outlines of exactly uniform thickness.

_SQRT2 = math.sqrt(2.0)
_SQRT3 = math.sqrt(3.0)
_STAR_INNER = math.cos(math.radians(72)) / math.cos(math.radians(36))  # inner/outer radius
_STAR_WIDTH = 2 * math.cos(math.radians(18))  # bounding box of a unit-radius star
_STAR_HEIGHT = 1 + math.cos(math.radians(36))
_STAR_UNIT = [
    ((1.0 if k % 2 == 0 else _STAR_INNER) * math.cos(math.radians(-90 + 36 * k)),
     (1.0 if k % 2 == 0 else _STAR_INNER) * math.sin(math.radians(-90 + 36 * k)))
    for k in range(10)
]
# Distance from the star's centre to the line of each of its (congruent) edges.
_STAR_EDGE = abs(_STAR_UNIT[0][0] * _STAR_UNIT[1][1] - _STAR_UNIT[0][1] * _STAR_UNIT[1][0]) / math.dist(
    _STAR_UNIT[0], _STAR_UNIT[1])


def _shape_polygon(shape: str, cx: float, cy: float, s: float, inset: float = 0.0) -> list[tuple[float, float]]:
    if shape == "正方形":
        h = s / 2 - inset
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "菱形":  # a square rotated 45 degrees whose bounding box has side s
        r = s / 2 - inset * _SQRT2
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "三角形":  # equilateral, apex up, side s; the box is centred on (cx, cy)
        height = s * _SQRT3 / 2
        gy = cy + height / 6  # the incentre sits a third of the height above the base
        k = 1 - inset / (height / 3)
        corners = [(cx, cy - height / 2), (cx + s / 2, cy + height / 2), (cx - s / 2, cy + height / 2)]
        return [(cx + (x - cx) * k, gy + (y - gy) * k) for x, y in corners]
    if shape == "五角星":  # point up; s is the box width (the larger side)
        radius = s / _STAR_WIDTH
        sy = cy - radius * _STAR_HEIGHT / 2 + radius  # star centre, so the box is centred on (cx, cy)
        r = radius * (1 - inset / (radius * _STAR_EDGE))
        return [(cx + ux * r, sy + uy * r) for ux, uy in _STAR_UNIT]
    raise ValueError(f"unknown polygon shape {shape!r}")


def _shape_mask(shape: str, cx: float, cy: float, s: float, inset: float, box: tuple[int, int, int, int],
                antialias: bool = True) -> Image.Image:
    """Mask ("L") of the shape over the canvas rectangle `box`.

    Anti-aliased masks hold the pixel coverage (supersampled); hard-edged ones (pixel art) take the
    pixels whose centre is inside, which keeps a square a rectangle of whole pixels.
    """
    ss = SUPERSAMPLE if antialias else 1
    x0, y0, x1, y1 = box
    mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(mask)
    # Canvas coordinates are continuous (pixel i spans [i, i+1)); PIL fills the supersampled pixels
    # whose index falls inside, so subtract half a pixel to keep the shape centred.
    to_mask = lambda x, y: ((x - x0) * ss - 0.5, (y - y0) * ss - 0.5)  # noqa: E731
    if shape == "圆形":
        r = s / 2 - inset
        (ax, ay), (bx, by) = to_mask(cx - r, cy - r), to_mask(cx + r, cy + r)
        draw.ellipse([ax, ay, bx, by], fill=255)
    else:
        draw.polygon([to_mask(x, y) for x, y in _shape_polygon(shape, cx, cy, s, inset)], fill=255)
    return mask.reduce(ss) if ss > 1 else mask


@dataclass
class Placement:
    shape: str
    colour: tuple[int, int, int] | None
    cx: float
    cy: float
    size: float  # bounding-box side in pixels


def _layout(fields: CaptionFields, width: int, height: int, rng: np.random.Generator) -> list[Placement]:
    short = min(width, height)
    placements = []
    if len(fields.objects) == 1:
        x_centres, x_jitter, size_range = (0.5,), ONE_OBJECT_JITTER, ONE_OBJECT_SIZE
    else:
        x_centres, x_jitter, size_range = TWO_OBJECT_CENTRES, TWO_OBJECT_JITTER, TWO_OBJECT_SIZE
    for (colour, shape), x_centre in zip(fields.objects, x_centres):
        size = rng.uniform(*size_range) * short
        cx = width * (x_centre + rng.uniform(-x_jitter, x_jitter))
        cy = height * (0.5 + rng.uniform(-ONE_OBJECT_JITTER, ONE_OBJECT_JITTER))
        placements.append(Placement(shape, COLOURS[colour] if colour else None, cx, cy, size))
    return placements


def _box(p: Placement, margin: float, shift: float = 0.0) -> tuple[int, int, int, int]:
    half = p.size / 2 + margin
    return (math.floor(p.cx + shift - half), math.floor(p.cy + shift - half),
            math.ceil(p.cx + shift + half) + 1, math.ceil(p.cy + shift + half) + 1)


def _lighten(c, amount):
    return tuple(round(v + (255 - v) * amount) for v in c)


def _darken(c, amount):
    return tuple(round(v * (1 - amount)) for v in c)


def _radial_gradient(p: Placement, box) -> Image.Image:
    """Lightened 40% at the box's top-left corner, darkened 30% at its bottom-right corner."""
    x0, y0, x1, y1 = box
    ox, oy = p.cx - p.size / 2, p.cy - p.size / 2
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - ox
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5 - oy
    t = np.clip(np.sqrt(xs[None, :] ** 2 + ys[:, None] ** 2) / (p.size * _SQRT2), 0.0, 1.0)[..., None]
    light = np.array(_lighten(p.colour, 0.40), dtype=np.float32)
    dark = np.array(_darken(p.colour, 0.30), dtype=np.float32)
    return Image.fromarray((light + (dark - light) * t + 0.5).astype(np.uint8), "RGB")


def _draw_object(canvas: Image.Image, style: str, p: Placement, background: tuple[int, int, int],
                 antialias: bool) -> None:
    mask = lambda inset=0.0, shift=0.0, margin=1.0: _shape_mask(  # noqa: E731
        p.shape, p.cx + shift, p.cy + shift, p.size, inset, _box(p, margin, shift), antialias)
    if style == "卡通风格":
        canvas.paste(OUTLINE_COLOUR, _box(p, 1.0), mask())
        canvas.paste(p.colour, _box(p, 1.0), mask(inset=CARTOON_OUTLINE * p.size))
    elif style == LINE_ART:
        canvas.paste(OUTLINE_COLOUR, _box(p, 1.0), mask())
        canvas.paste(background, _box(p, 1.0), mask(inset=LINE_ART_OUTLINE * p.size))
    elif style == "写实风格":
        offset, blur = SHADOW_OFFSET * p.size, SHADOW_BLUR * p.size
        margin = 3 * blur + 2
        shadow = mask(shift=offset, margin=margin).filter(ImageFilter.GaussianBlur(blur))
        shadow = shadow.point(lambda v: round(v * SHADOW_OPACITY))
        canvas.paste(SHADOW_GREY, _box(p, margin, offset), shadow)
        box = _box(p, 1.0)
        canvas.paste(_radial_gradient(p, box), box, mask())
    elif style == "3D风格":
        offset = EXTRUDE_OFFSET * p.size
        canvas.paste(_darken(p.colour, 0.50), _box(p, 1.0, offset), mask(shift=offset))
        canvas.paste(p.colour, _box(p, 1.0), mask())
    else:  # 像素风格 and 水彩风格: flat fill, no outline; the whole-image effect comes afterwards
        canvas.paste(p.colour, _box(p, 1.0), mask())


def _blur_objects(canvas: Image.Image, placements: list[Placement], radius: float) -> None:
    """Gaussian-blur the whole canvas, in place, by blurring only the patches around the objects.

    Blurring a flat background changes nothing, so this equals blurring the whole image (Pillow's
    Gaussian is three box passes, each reaching about `radius` pixels) at a third of the cost.
    """
    margin = 3 * radius + 4
    boxes = [_box(p, margin) for p in placements]
    if len(boxes) == 2 and boxes[0][2] > boxes[1][0]:  # overlapping patches must be blurred once
        boxes = [(min(b[0] for b in boxes), min(b[1] for b in boxes),
                  max(b[2] for b in boxes), max(b[3] for b in boxes))]
    for x0, y0, x1, y1 in boxes:
        box = (max(x0, 0), max(y0, 0), min(x1, canvas.width), min(y1, canvas.height))
        canvas.paste(canvas.crop(box).filter(ImageFilter.GaussianBlur(radius)), box)


def render_ad(fields: CaptionFields, rng: np.random.Generator) -> Image.Image:
    """Draw the ad described by `fields`; the canvas size, layout and noise come from `rng`."""
    _check_fields(fields)
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    placements = _layout(fields, width, height, rng)
    background = BACKGROUNDS[LINE_ART_BACKGROUND if fields.style == LINE_ART else fields.background]

    if fields.style == "像素风格":
        # Draw the whole scene at 1/16 of each side with hard edges, then blow it up into 16x16 blocks.
        small = Image.new("RGB", (math.ceil(width / PIXEL_FACTOR), math.ceil(height / PIXEL_FACTOR)), background)
        f = 1.0 / PIXEL_FACTOR
        for p in placements:
            scaled = Placement(p.shape, p.colour, p.cx * f, p.cy * f, p.size * f)
            _draw_object(small, fields.style, scaled, background, antialias=False)
        big = small.resize((small.width * PIXEL_FACTOR, small.height * PIXEL_FACTOR), Image.NEAREST)
        return big.crop((0, 0, width, height))

    canvas = Image.new("RGB", (width, height), background)
    for p in placements:
        _draw_object(canvas, fields.style, p, background, antialias=True)
    if fields.style == "水彩风格":
        _blur_objects(canvas, placements, WATERCOLOUR_BLUR * min(width, height))
        noise = rng.integers(-WATERCOLOUR_NOISE, WATERCOLOUR_NOISE + 1, size=(height, width, 3), dtype=np.int16)
        canvas = Image.fromarray(np.clip(np.asarray(canvas, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    return canvas


def encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Rows, dirty rows and splits


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


def _make_noisy(row: SyntheticRow, fields: CaptionFields, rng: np.random.Generator, seed: int, donor: int) -> None:
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


def _make_dirty(row: SyntheticRow, jpeg: bytes, rng: np.random.Generator) -> None:
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


def _render_rows(job: tuple[str, int, list[tuple]]) -> list[SyntheticRow]:
    """Worker: render the rows (index, id, dirty kind, (noise kind, donor) or None) of one chunk."""
    split, seed, items = job
    rows = []
    for index, rid, dirty, noise in items:
        rng = np.random.default_rng([seed, SPLITS[split], index])
        fields = sample_fields(rng)
        jpeg = encode_jpeg(render_ad(fields, rng))
        row = SyntheticRow(rid, base64.b64encode(jpeg).decode("ascii"), format_caption(fields), dirty)
        if dirty:
            _make_dirty(row, jpeg, rng)
        elif noise:
            row.noise = noise[0]
            _make_noisy(row, fields, np.random.default_rng([seed, SPLITS[split], index, 7]), seed, noise[1])
        rows.append(row)
    return rows


def _pool(workers: int):
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else methods[0]).Pool(workers)


def generate_split(split: str, n: int, seed: int, *, workers: int = 1, pool=None,
                   noise: NoiseConfig | None = None) -> Iterator[SyntheticRow]:
    """Yield the `n` rows of `split` in order; dirty and noisy rows only in "train".

    Rows are rendered in chunks by `pool` (or by a pool of `workers` processes made here); the result
    does not depend on either.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    dirty = plan_dirty_rows(seed, n) if split == "train" else {}
    noisy = plan_noise_rows(seed, n, dirty, noise) if split == "train" and noise is not None else {}
    ids: list[str] = []
    for i in range(n):
        # A duplicated-id row reuses the id of the row just before it.
        ids.append(ids[i - 1] if dirty.get(i) == "duplicate_id" else row_id(split, i))
    items = [(i, ids[i], dirty.get(i), noisy.get(i)) for i in range(n)]
    chunk = max(1, min(32, math.ceil(n / 8)))  # small enough to keep two workers busy on small splits
    jobs = [(split, seed, items[i:i + chunk]) for i in range(0, n, chunk)]

    if pool is None and (workers <= 1 or len(jobs) <= 1):
        for job in jobs:
            yield from _render_rows(job)
        return
    own = pool is None
    pool = _pool(workers) if own else pool
    try:
        for rows in pool.imap(_render_rows, jobs):
            yield from rows
    finally:
        if own:
            pool.terminate()
            pool.join()


def write_dataset(out_dir: str | Path, n_train: int, n_val: int, n_test: int, seed: int,
                  workers: int | None = None, progress: bool = True, noise: NoiseConfig | None = None) -> dict:
    """Write train.tsv, val.tsv, test.tsv and test_refs.tsv (each atomically); return a summary.

    With `noise`, also train_noise.tsv (`id \t kind \t truth` of every noisy training row) and, if
    it asks for an unlabeled pool, unlabeled.tsv and unlabeled_refs.tsv.
    """
    from contextlib import ExitStack

    from tqdm import tqdm

    for name, value in (("--train", n_train), ("--val", n_val), ("--test", n_test)):
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    workers = cpu_count() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")
    names = ["train", "val", "test", "test_refs"]
    if noise is not None:
        noise.validate()
        names.append("train_noise")
        if noise.unlabeled:
            names += ["unlabeled", "unlabeled_refs"]
    files = {name: out_dir / f"{name}.tsv" for name in names}
    n_unlabeled = noise.unlabeled if noise is not None else 0

    start = time.perf_counter()
    dirty_counts = Counter({kind: 0 for kind in DIRTY_KINDS})
    noise_counts = Counter({kind: 0 for kind in NOISE_KINDS}) if noise is not None else Counter()
    total = n_train + n_val + n_test + n_unlabeled
    pool = _pool(workers) if workers > 1 and total > 1 else None
    try:
        with ExitStack() as stack, tqdm(total=total, desc="synthetic ads", unit="img", disable=not progress) as bar:
            out = {name: stack.enter_context(atomic_write(path)) for name, path in files.items()}
            for split, n in (("train", n_train), ("val", n_val), ("test", n_test), ("unlabeled", n_unlabeled)):
                for row in generate_split(split, n, seed, pool=pool, noise=noise):
                    if split in ("test", "unlabeled"):
                        out[split].write(f"{row.id}\t{row.image_b64}\n")
                        out[f"{split}_refs"].write(f"{row.id}\t{row.caption}\n")
                    else:
                        out[split].write(row.line() + "\n")
                    if row.dirty:
                        dirty_counts[row.dirty] += 1
                    if row.noise:
                        noise_counts[row.noise] += 1
                        out["train_noise"].write(f"{row.id}\t{row.noise}\t{row.noise_detail}\n")
                    bar.update(1)
    except OSError as err:
        raise UserError(f"cannot write {err.filename or out_dir}: {err.strerror or err}") from None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    n_dirty = sum(dirty_counts.values())
    summary = {
        "out_dir": str(out_dir),
        "files": {name: str(path) for name, path in files.items()},
        "seed": seed,
        "counts": {"train": n_train, "val": n_val, "test": n_test},
        "train_clean": n_train - n_dirty,
        "train_dirty": n_dirty,
        "dirty": dict(dirty_counts),
        "workers": workers,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if noise is not None:
        summary["counts"]["unlabeled"] = n_unlabeled
        summary["noise"] = dict(noise_counts)
        summary["train_clean"] -= sum(noise_counts.values())
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic ad-image captioning dataset (train/val/test TSV in the contest format).")
    parser.add_argument("out_dir", help="directory for train.tsv, val.tsv, test.tsv, test_refs.tsv")
    parser.add_argument("--train", type=int, default=2000, help="training rows, ~8%% of them dirty (default 2000)")
    parser.add_argument("--val", type=int, default=200, help="validation rows (default 200)")
    parser.add_argument("--test", type=int, default=200, help="test rows (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes to render with (default: the core count); output does not depend on it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    noise = parser.add_argument_group("noise for data curation (docs/synthetic_ads.md; off by default)")
    noise.add_argument("--mismatched", type=float, default=0.0, help="share of training rows with another image's caption")
    noise.add_argument("--wrong-word", type=float, default=0.0, help="share with a wrong style or colour word")
    noise.add_argument("--truncated", type=float, default=0.0, help="share with a truncated caption")
    noise.add_argument("--near-duplicates", type=float, default=0.0,
                       help="share whose image is a near-identical copy of an earlier row's")
    noise.add_argument("--unlabeled", type=int, default=0, help="images in an unlabeled pool (unlabeled.tsv)")
    args = parser.parse_args(argv)
    cfg = NoiseConfig(args.mismatched, args.wrong_word, args.truncated, args.near_duplicates, args.unlabeled)
    summary = write_dataset(args.out_dir, args.train, args.val, args.test, args.seed,
                            workers=args.workers, progress=not args.quiet,
                            noise=cfg if cfg.any or cfg.unlabeled else None)
    files, counts = summary["files"], summary["counts"]
    dirty = ", ".join(f"{kind}={n}" for kind, n in summary["dirty"].items())
    print(f"wrote {files['train']}: {counts['train']} rows ({summary['train_clean']} clean, "
          f"{summary['train_dirty']} dirty: {dirty})")
    print(f"wrote {files['val']}: {counts['val']} rows")
    print(f"wrote {files['test']}: {counts['test']} rows (id, base64) and {files['test_refs']} (id, caption)")
    if "noise" in summary:
        noisy = ", ".join(f"{kind}={n}" for kind, n in summary["noise"].items())
        print(f"wrote {files['train_noise']}: the noisy training rows ({noisy}); not training data")
        if summary["counts"]["unlabeled"]:
            print(f"wrote {files['unlabeled']}: {summary['counts']['unlabeled']} unlabeled images "
                  f"(references in {files['unlabeled_refs']})")
    print(f"seed {summary['seed']}, {summary['workers']} worker(s), {summary['seconds']:.1f} s")
    return 0
