"""Drawing a row's image from its caption fields (spec "Rendering"): layout, the six styles, JPEG."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import BACKGROUNDS, COLOURS, LINE_ART, LINE_ART_BACKGROUND, CaptionFields, check_fields

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
    check_fields(fields)
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
