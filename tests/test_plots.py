"""Caption grid and learning-curve PNGs, CJK font discovery, and never drawing tofu."""
import importlib.util

import numpy as np
import pytest
from PIL import Image

from paddle_caption.fonts import (PROBE_TEXT, fallback_font_path, find_cjk_font, font_covers,
                                       missing_font_message)
from paddle_caption.demo.plots import (NEEDS_CJK_NOTE, NO_LINE_START, GridStyle, _TextFont,
                                       caption_grid_png, grid_size, learning_curve_png)

HAS_CJK = find_cjk_font() is not None
needs_cjk = pytest.mark.skipif(not HAS_CJK, reason="no CJK font installed (pip install paperang-p2-fonts-cjk)")
STYLE = GridStyle()
RED = (220, 40, 40)


def item(key, prediction, reference=None, colour=RED):
    return {"id": key, "image": Image.new("RGB", (400, 300), colour), "prediction": prediction,
            "reference": reference}


def caption_line_box(index, columns=4, has_reference=True, header=0, style=STYLE):
    """Pixel box of the first predicted-caption line of cell `index` (right of the 'pred' label)."""
    cell_h = grid_size(1, 1, has_reference, False, style)[1]
    x0 = (index % columns) * style.cell_width + style.padding + 50
    y0 = header + (index // columns) * cell_h + style.padding + style.thumb_height + 8 + 19 + 4
    return x0, y0, (index % columns + 1) * style.cell_width - style.padding, y0 + 23


def dark_pixels(img, box, below=60):
    return int((np.asarray(img.crop(box).convert("L")) < below).sum())


def test_pinned_font_package_is_found_first():
    if importlib.util.find_spec("paperang_p2_fonts_cjk") is None:
        pytest.skip("paperang-p2-fonts-cjk not installed")
    path = find_cjk_font()
    assert path is not None and path.name == "wqy-microhei.ttc"
    assert font_covers(path, PROBE_TEXT + "卡通写实像素水彩黑白简笔3D红绿蓝黄紫橙白黑灰米")
    assert missing_font_message() is None


def test_font_coverage_check():
    latin = fallback_font_path()
    assert font_covers(latin, "CIDEr-D 0.5")
    assert not font_covers(latin, "中文")
    font = _TextFont(latin, 14)
    assert font.drawable("ok 中") == "ok ?"  # a stray glyph becomes "?"
    assert font.drawable("3D风格") == NEEDS_CJK_NOTE  # mostly undrawable: a note, never tofu


def test_grid_size_arithmetic():
    # cell: padding 12 + thumb 200 + 8 + id line round(14 * 1.35) = 19 + 4
    #       + caption 3 lines * round(17 * 1.35) = 69 [+ 6 + 69 with references] + padding 12
    assert grid_size(5, 4, True, False) == (4 * 300, 2 * 399)
    assert grid_size(5, 4, False, False) == (4 * 300, 2 * 324)
    assert grid_size(3, 4, True, True) == (3 * 300, 36 + 399)  # fewer items than columns


@needs_cjk
def test_grid_png_draws_cjk_captions(tmp_path):
    items = [item("a", "中中中中", "中中中中"), item("b", "文文文文", "中文"), item("c", "", "参考"),
             item("d", "卡通风格。图片中间是一个红色的圆形，背景是白色。", None, colour=(40, 80, 220)),
             item("e", "x" * 300, "y")]
    out = tmp_path / "grid.png"
    assert caption_grid_png(items, out) is None
    img = Image.open(out)
    assert img.size == grid_size(5, 4, True, False) == (1200, 798)
    # Captions drew dark glyph pixels; the empty prediction did not (its "(empty)" note is grey).
    for index in (0, 1, 3, 4):
        assert dark_pixels(img, caption_line_box(index)) > 40
    assert dark_pixels(img, caption_line_box(2)) == 0
    # Item d has no reference: its reference block stays blank (item a's shows the reference).
    x0, y0, x1, y1 = caption_line_box(3)
    ref_box = (x0 - 50, y0 + 3 * 23 + 6, x1, y1 + 3 * 23 + 6)
    assert dark_pixels(img, ref_box, below=250) == 0
    assert dark_pixels(img, (ref_box[0] - 900, ref_box[1], ref_box[2] - 900, ref_box[3]), below=200) > 40
    # Different characters give different bitmaps: real glyphs, not identical tofu boxes.
    a = np.asarray(img.crop(caption_line_box(0)).convert("L"))
    b = np.asarray(img.crop(caption_line_box(1)).convert("L"))
    assert (a != b).sum() > 40
    # The thumbnail is pasted into its tile.
    assert img.getpixel((150, 12 + 100)) == RED
    assert img.getpixel((3 * 300 + 150, 12 + 100)) == (40, 80, 220)


def test_grid_without_cjk_font_still_draws_images_and_warns(tmp_path):
    items = [item("a", "卡通风格。图片中间是一个红色的圆形。", "卡通风格"), item("b", "hello world")]
    out = tmp_path / "grid.png"
    warning = caption_grid_png(items, out, columns=2, find_font=False)
    assert warning is not None and "paperang-p2-fonts-cjk" in warning and "fonts-wqy-microhei" in warning
    img = Image.open(out)
    header = STYLE.header_height
    assert img.size == grid_size(2, 2, True, True) == (600, header + 399)
    assert img.getpixel((150, header + 12 + 100)) == RED
    # The Chinese caption is replaced by a grey note, the ASCII one is drawn in black.
    assert dark_pixels(img, caption_line_box(0, columns=2, header=header)) == 0
    assert dark_pixels(img, caption_line_box(1, columns=2, header=header)) > 40


def test_wrap_keeps_punctuation_off_line_starts_and_within_width():
    path = find_cjk_font() or fallback_font_path()
    font = _TextFont(path, 17)
    text = "水彩风格。图片左边是一个蓝色的五角星，右边是一个黄色的菱形，背景是米色。" * 2
    for width in (120, 150, 200, 276):
        lines = font.wrap(text, width, max_lines=50)
        assert "".join(lines) == text
        assert all(line[0] not in NO_LINE_START for line in lines)
        assert all(font.font.getlength(line) <= width for line in lines)
    short = font.wrap(text, 150, max_lines=2)
    assert len(short) == 2 and short[-1].endswith("…")


def test_learning_curve_png(tmp_path):
    runs = {
        "image model": [{"kind": "train", "elapsed_s": 6.0 * s, "loss": 3.0 / (1 + s)} for s in range(30)]
        + [{"kind": "eval", "elapsed_s": 60.0 * k, "CIDEr-D": 2.0 * k} for k in range(4)],
        # records without "kind" are recognised by their keys; a missing eval panel is fine
        "no-image ablation": [{"elapsed_s": 10.0 * s, "loss": 3.5 - 0.05 * s} for s in range(5)],
    }
    out = learning_curve_png(runs, tmp_path / "curves.png", title="demo")
    img = Image.open(out)
    assert img.size == (1210, 462)  # 11 x 4.2 inches at 110 dpi
    pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
    # Both run colours (matplotlib C0 blue, C1 orange) appear.
    assert ((abs(pixels.astype(int) - (31, 119, 180)).sum(1)) < 30).sum() > 100
    assert ((abs(pixels.astype(int) - (255, 127, 14)).sum(1)) < 30).sum() > 100
    empty = learning_curve_png({"run": []}, tmp_path / "empty.png")
    assert empty.exists()
