"""The demo's pictures: a grid of images with their predicted captions, and learning curves.

Text is drawn only with a font that has the glyphs for it: without a CJK font the grid still shows
the images, ids and any ASCII text, hides Chinese captions behind a short note, and says which font
is missing, rather than drawing rows of tofu boxes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..files import atomic_write
from ..fonts import INSTALL_HINT, fallback_font_path, find_cjk_font, font_codepoints, matplotlib_cjk_family

PRINTABLE_ASCII = frozenset(range(0x20, 0x7F))
NEEDS_CJK_NOTE = "(caption needs a CJK font)"
EMPTY_NOTE = "(empty)"
# Punctuation that must not start a line (kinsoku): the character before it moves down with it.
NO_LINE_START = set("，。、：；！？）》」』”’,.:;!?)")


# ---------------------------------------------------------------------------------------------
# Text helpers


class _TextFont:
    """A PIL font plus the set of code points it can draw."""

    def __init__(self, path: Path | None, size: int):
        if path is not None:
            self.font = ImageFont.truetype(str(path), size, index=0)
            self.codepoints = font_codepoints(str(path))
        else:  # no font file at all: PIL's built-in font, trusted for printable ASCII only
            self.font = ImageFont.load_default(size)
            self.codepoints = PRINTABLE_ASCII
        self.line_height = round(size * 1.35)

    def drawable(self, text: str) -> str:
        """`text` with glyphs the font lacks replaced by "?", or a note if most of it is missing."""
        missing = sum(1 for ch in text if ord(ch) not in self.codepoints and not ch.isspace())
        if missing == 0:
            return text
        if missing * 3 > len(text):
            return NEEDS_CJK_NOTE
        return "".join(ch if ord(ch) in self.codepoints or ch.isspace() else "?" for ch in text)

    def wrap(self, text: str, width: float, first_indent: float = 0.0, max_lines: int = 3) -> list[str]:
        """Greedy wrap by pixel width, character by character (Chinese has no spaces to break at)."""
        lines, line, limit = [], "", width - first_indent
        for ch in text:
            if line and self.font.getlength(line + ch) > limit:
                carry = ch
                if ch in NO_LINE_START and len(line) > 1:
                    line, carry = line[:-1], line[-1] + ch
                lines.append(line)
                line, limit = carry.lstrip(), width
            else:
                line += ch
        if line:
            lines.append(line)
        if len(lines) > max_lines:
            last = lines[max_lines - 1]
            while last and self.font.getlength(last + "…") > (width if max_lines > 1 else limit):
                last = last[:-1]
            lines = lines[:max_lines - 1] + [last + "…"]
        return lines


# ---------------------------------------------------------------------------------------------
# Caption grid


@dataclass
class GridStyle:
    cell_width: int = 300
    thumb_height: int = 200
    padding: int = 12
    font_size: int = 17
    small_font_size: int = 14
    max_caption_lines: int = 3
    header_height: int = 36
    background: tuple = (255, 255, 255)
    tile: tuple = (238, 238, 238)
    border: tuple = (210, 210, 210)
    match_border: tuple = (46, 125, 50)  # a prediction equal to its reference gets a green frame
    text: tuple = (20, 20, 20)
    muted: tuple = (110, 110, 110)
    pred_label: tuple = (25, 90, 190)
    ref_label: tuple = (46, 125, 50)
    warning: tuple = (180, 40, 40)


def _cell_height(style: GridStyle, has_reference: bool) -> int:
    line = round(style.font_size * 1.35)
    small = round(style.small_font_size * 1.35)
    caption_block = style.max_caption_lines * line
    return (style.padding + style.thumb_height + 8 + small + 4 + caption_block
            + ((6 + caption_block) if has_reference else 0) + style.padding)


def grid_size(n_items: int, columns: int, has_reference: bool, has_header: bool,
              style: GridStyle = GridStyle()) -> tuple[int, int]:
    """Pixel size of the grid `caption_grid_png` draws for these items."""
    columns = max(1, min(columns, n_items))
    rows = math.ceil(n_items / columns)
    header = style.header_height if has_header else 0
    return columns * style.cell_width, header + rows * _cell_height(style, has_reference)


def caption_grid_png(items: Sequence[Mapping], path: str | Path, columns: int = 4,
                     font: str | Path | None = None, *, find_font: bool = True, title: str | None = None,
                     style: GridStyle = GridStyle()) -> str | None:
    """Draw thumbnails with their id, predicted caption and (optionally) reference into a PNG.

    items: dicts with "id", "image" (PIL image or None), "prediction" and optionally "reference".
    font: a font file for the captions; None looks for a CJK font unless `find_font` is False.
    Returns None, or a warning naming the missing font when Chinese text could not be drawn.
    """
    if not items:
        raise ValueError("caption_grid_png needs at least one item")
    font_path = Path(font) if font is not None else (find_cjk_font() if find_font else None)
    warning = None
    if font_path is None:
        font_path, warning = fallback_font_path(), INSTALL_HINT
    big = _TextFont(font_path, style.font_size)
    small = _TextFont(font_path, style.small_font_size)
    texts = [str(it.get("prediction") or "") + str(it.get("reference") or "") for it in items]
    if warning is None and any(big.drawable(t) != t for t in texts):
        warning = f"font {font_path.name} lacks glyphs used by the captions; {INSTALL_HINT}"

    has_reference = any(it.get("reference") is not None for it in items)
    header_text = " - ".join(t for t in (title, warning) if t)
    width, height = grid_size(len(items), columns, has_reference, bool(header_text), style)
    columns = max(1, min(columns, len(items)))
    cell_h = _cell_height(style, has_reference)
    canvas = Image.new("RGB", (width, height), style.background)
    draw = ImageDraw.Draw(canvas)

    top = 0
    if header_text:
        header_font = _TextFont(font_path, style.font_size)
        line = header_font.wrap(header_font.drawable(header_text), width - 2 * style.padding, max_lines=1)[0]
        draw.text((style.padding, (style.header_height - style.font_size) // 2), line,
                  font=header_font.font, fill=style.warning if warning else style.text)
        top = style.header_height

    inner = style.cell_width - 2 * style.padding
    for index, item in enumerate(items):
        x0 = (index % columns) * style.cell_width
        y0 = top + (index // columns) * cell_h
        prediction = str(item.get("prediction") or "")
        reference = item.get("reference")
        exact = reference is not None and prediction.strip() == str(reference).strip()
        draw.rectangle([x0 + 3, y0 + 3, x0 + style.cell_width - 4, y0 + cell_h - 4],
                       outline=style.match_border if exact else style.border, width=2 if exact else 1)

        # Thumbnail, scaled to fit the tile with its aspect ratio kept.
        tile = (x0 + style.padding, y0 + style.padding, x0 + style.padding + inner,
                y0 + style.padding + style.thumb_height)
        draw.rectangle(tile, fill=style.tile)
        image = item.get("image")
        if image is not None:
            thumb = ImageOps.contain(image.convert("RGB"), (inner, style.thumb_height), Image.LANCZOS)
            canvas.paste(thumb, (tile[0] + (inner - thumb.width) // 2,
                                 tile[1] + (style.thumb_height - thumb.height) // 2))
        else:
            draw.text((tile[0] + 8, tile[1] + 8), "no image", font=small.font, fill=style.muted)

        y = tile[3] + 8
        id_line = small.wrap(small.drawable(f"id {item.get('id', index)}"), inner, max_lines=1)[0]
        draw.text((tile[0], y), id_line, font=small.font, fill=style.muted)
        if exact:
            tag = "= ref"
            draw.text((tile[2] - small.font.getlength(tag), y), tag, font=small.font, fill=style.match_border)
        y += small.line_height + 4

        blocks = [("pred", prediction, style.pred_label, style.text)]
        if reference is not None:
            blocks.append(("ref", str(reference), style.ref_label, style.muted))
        for label, text, label_colour, text_colour in blocks:
            label_text = label + "  "
            indent = big.font.getlength(label_text)
            draw.text((tile[0], y + (style.font_size - style.small_font_size)), label_text,
                      font=small.font, fill=label_colour)
            shown = big.drawable(text) if text.strip() else EMPTY_NOTE
            if shown in (EMPTY_NOTE, NEEDS_CJK_NOTE):  # notes about the text, not the text: muted
                text_colour = style.muted
            lines = big.wrap(shown, inner, first_indent=indent, max_lines=style.max_caption_lines)
            for n, line in enumerate(lines):
                draw.text((tile[0] + (indent if n == 0 else 0), y + n * big.line_height), line,
                          font=big.font, fill=text_colour)
            y += style.max_caption_lines * big.line_height + 6

    with atomic_write(path, "wb") as handle:
        canvas.save(handle, format="PNG")
    return warning


# ---------------------------------------------------------------------------------------------
# Learning curves


def _kind(record: Mapping) -> str | None:
    if "kind" in record:
        return record["kind"]
    if "CIDEr-D" in record:
        return "eval"
    return "train" if "loss" in record else None


def _series(records: Sequence[Mapping], kind: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for record in records:
        value = record.get(key)
        if _kind(record) != kind or value is None or "elapsed_s" not in record:
            continue
        value = float(value)
        if math.isfinite(value):
            xs.append(float(record["elapsed_s"]) / 60.0)
            ys.append(value)
    return xs, ys


def _centred_mean(values: list[float], half_width: int = 3) -> list[float]:
    """Rolling mean over a centred window (narrower at the ends). Unlike an exponential average it
    does not lag: the loss falls fastest in the first minute, and a lagging curve moved that drop
    minutes to the right."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - half_width):i + half_width + 1]
        out.append(sum(window) / len(window))
    return out


def learning_curve_png(runs: Mapping[str, Sequence[Mapping]], path: str | Path,
                       title: str | None = None) -> Path:
    """Two panels, training loss and CIDEr-D against wall time (minutes), every run overlaid.

    runs maps a run name to its log records: {"kind": "train", "elapsed_s", "loss"} and
    {"kind": "eval", "elapsed_s", "CIDEr-D"} (other keys are ignored).
    """
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cjk = matplotlib_cjk_family()
    # Per-glyph fallback: Latin from DejaVu Sans, Chinese run names from the CJK font if there is one.
    families = ["DejaVu Sans"] + ([cjk] if cjk else [])
    latin = _TextFont(fallback_font_path(), 10)

    def label(name: str) -> str:
        return name if cjk else latin.drawable(name)

    with rc_context({"font.family": families, "axes.spines.top": False, "axes.spines.right": False}):
        fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        ax_loss, ax_cider = fig.subplots(1, 2)
        colours = [f"C{i % 10}" for i in range(len(runs))]
        any_eval = False
        for colour, (name, records) in zip(colours, runs.items()):
            xs, ys = _series(records, "train", "loss")
            if xs:
                if len(xs) >= 10:  # noisy per-step losses: faint raw curve under a smoothed one
                    ax_loss.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
                    ax_loss.plot(xs, _centred_mean(ys), color=colour, linewidth=1.8, label=label(name))
                else:
                    ax_loss.plot(xs, ys, color=colour, linewidth=1.8, marker=".", label=label(name))
            xs, ys = _series(records, "eval", "CIDEr-D")
            if xs:
                any_eval = True
                ax_cider.plot(xs, ys, color=colour, marker="o", markersize=4, linewidth=1.8, label=label(name))
                ax_cider.annotate(f"{ys[-1]:.2f}", (xs[-1], ys[-1]), textcoords="offset points",
                                  xytext=(5, 4), color=colour, fontsize=9)
        ax_loss.set(title="training loss", xlabel="wall time (min)", ylabel="loss (log scale)")
        # log scale: the loss drops ~50x in the first minutes, and the gap between runs that
        # matters (with vs without images) is in the flat tail
        if all(y > 0 for line in ax_loss.get_lines() for y in line.get_ydata()):
            ax_loss.set_yscale("log")
        ax_cider.set(title="validation CIDEr-D", xlabel="wall time (min)", ylabel="CIDEr-D")
        if not any_eval:
            ax_cider.text(0.5, 0.5, "no evaluations logged", ha="center", va="center",
                          transform=ax_cider.transAxes, color="grey")
        for ax in (ax_loss, ax_cider):
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(frameon=False)
        if title:
            fig.suptitle(label(title))
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format="png")
    return Path(path)
