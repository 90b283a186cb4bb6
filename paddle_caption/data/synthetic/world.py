"""The synthetic world's vocabulary and its caption grammar (spec tables and "Captions").

A caption names exactly the fields of its image (`CaptionFields`): style, background, and one or
two coloured shapes. `format_caption` writes the grammar, `parse_caption` reads it back (the field
accuracy of `eval/fields.py`), `sample_fields` draws a row's fields from its RNG.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

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


def check_fields(fields: CaptionFields) -> None:
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
    check_fields(fields)
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
