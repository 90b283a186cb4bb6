"""Dataset statistics and plots: python tools/analyze_data.py INPUT(.tsv|records.jsonl) OUT_DIR

Writes to OUT_DIR: `caption_length.png` (characters, jieba words, tokens), `image_size.png`,
`style_frequency.png`, `duplicate_captions.png`, `summary.txt` and `summary.json`. The token
percentiles (Qwen tokenizer if importable, else characters) are what `max_new_tokens` is chosen from:
a caption is generated as its tokens plus one end token (`<|im_end|>`). The statistics themselves
are computed, streaming, in `stats.py`; this module draws and reports them.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from ..files import atomic_write
from ..fonts import INSTALL_HINT, matplotlib_cjk_family
from ..runtime import UserError
from .distribution import LengthHistogram
from .stats import DEFAULT_MAX_NEW_TOKENS, DatasetStats, build_summary, collect_stats, summary_text

# ASCII names for the synthetic world's styles, used when no CJK font is available for plots.
STYLE_ASCII = {"卡通风格": "cartoon", "写实风格": "realistic", "像素风格": "pixel-art", "水彩风格": "watercolour",
               "黑白简笔风格": "line-drawing", "3D风格": "3D"}


# --------------------------------------------------------------------------------- plots
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
    ax.bar(range(len(xs[:30])), [repeats[x] for x in xs[:30]], color="#4477aa",
           tick_label=[str(x) for x in xs[:30]])  # positions, not number-like strings, on the x axis
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
    cjk_font = matplotlib_cjk_family()
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
        print(f"note: {INSTALL_HINT}; plot labels are ASCII")
    print(text, end="")
    print("wrote " + ", ".join(str(p) for p in plots + [out_dir / "summary.txt", out_dir / "summary.json"]))
    return summary
