"""Find a font that can draw Chinese, for PIL caption grids and matplotlib labels.

Search order: the `paperang-p2-fonts-cjk` PyPI package (WenQuanYi Micro Hei, Apache-2.0, ~5 MB,
pinned in requirements.txt so that every machine has it), Debian's CJK font packages, then any font
matplotlib's font manager knows of. A candidate counts only if its character map really has glyphs
for the probe text, so a font that would draw tofu boxes is never chosen.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

# Characters the synthetic captions use, plus common ones: a font must cover all of them.
PROBE_TEXT = "中文图片风格背景圆形菱形五角星。，"
FONT_PACKAGE = "paperang-p2-fonts-cjk==0.1.0"
DEBIAN_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKsc-Regular.otf",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
)
INSTALL_HINT = (f"no font with Chinese glyphs found; install one with `pip install {FONT_PACKAGE}` "
                "or `apt-get install fonts-wqy-microhei`")


@functools.lru_cache(maxsize=64)
def font_codepoints(path: str | Path) -> frozenset[int]:
    """The code points the font (the first face of a collection) has glyphs for; empty if unreadable."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(str(path), fontNumber=0, lazy=True) as font:
            cmap = font.getBestCmap() or {}
    except Exception:  # noqa: BLE001 - any unreadable or odd font file is simply not a candidate
        return frozenset()
    return frozenset(cmap)


def font_covers(path: str | Path, text: str) -> bool:
    """True if the font has a glyph for every non-space character of `text`."""
    codepoints = font_codepoints(str(path))
    return bool(codepoints) and all(ord(ch) in codepoints for ch in text if not ch.isspace())


def _package_fonts() -> list[Path]:
    spec = importlib.util.find_spec("paperang_p2_fonts_cjk")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "fonts" / "wqy-microhei.ttc" for loc in spec.submodule_search_locations]


def _matplotlib_fonts() -> list[Path]:
    from matplotlib import font_manager

    # CJK-sounding names first, so the scan usually stops at the first candidate it reads.
    paths = sorted({entry.fname for entry in font_manager.fontManager.ttflist},
                   key=lambda p: not any(t in p.lower() for t in ("cjk", "wqy", "hei", "song", "ming", "han")))
    return [Path(p) for p in paths]


@functools.lru_cache(maxsize=1)
def find_cjk_font() -> Path | None:
    """Path of a font that draws simplified Chinese, or None when the machine has none."""
    for candidates in (_package_fonts, lambda: [Path(p) for p in DEBIAN_FONTS], _matplotlib_fonts):
        for path in candidates():
            if path.is_file() and font_covers(path, PROBE_TEXT):
                return path
    return None


def missing_font_message() -> str | None:
    """None if a CJK font was found, else a one-line message saying what to install."""
    return None if find_cjk_font() is not None else INSTALL_HINT


def fallback_font_path() -> Path | None:
    """A Latin font that always exists (matplotlib ships DejaVu Sans), for when there is no CJK font."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def matplotlib_cjk_family() -> str | None:
    """Register the CJK font with matplotlib and return its family name (None if there is none)."""
    path = find_cjk_font()
    if path is None:
        return None
    from matplotlib import font_manager

    font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path)).get_name()


@functools.lru_cache(maxsize=1)
def cjk_font_ttf_bytes() -> bytes | None:
    """The CJK font as one TrueType face (browsers do not load .ttc collections), or None."""
    path = find_cjk_font()
    if path is None:
        return None
    if path.suffix.lower() != ".ttc":
        return path.read_bytes()
    import io

    from fontTools.ttLib import TTFont

    buffer = io.BytesIO()
    with TTFont(str(path), fontNumber=0) as font:
        font.save(buffer)
    return buffer.getvalue()
