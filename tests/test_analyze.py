"""analyze_data: statistics of captions/images from a TSV or records.jsonl, plots and summaries."""
import base64
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from paddle_caption.data import analyze as an
from paddle_caption.data.analyze import analyze
from paddle_caption.data.distribution import LengthHistogram
from paddle_caption.data.stats import style_phrase
from paddle_caption.data.convert import CleanConfig, RunOptions, convert
from paddle_caption.runtime import UserError

CARTOON = "卡通风格。图片中间是一个红色的圆形，背景是白色。"
REALISTIC = "写实风格。图片左边是一个蓝色的菱形，右边是一个黄色的圆形，背景是米色。"
NO_STYLE = "图片中间是一个红色的圆形。"
SIZES = [(64, 48), (80, 40), (40, 90), (100, 100), (50, 60)]
CAPTIONS = [CARTOON, CARTOON, REALISTIC, CARTOON, NO_STYLE]


def jpeg_b64(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "JPEG", quality=90)
    return base64.b64encode(buf.getvalue())


@pytest.fixture
def tsv(tmp_path):
    rows = [f"id{i}\t".encode() + jpeg_b64(*size) + b"\t" + cap.encode()
            for i, (size, cap) in enumerate(zip(SIZES, CAPTIONS))]
    rows.insert(3, b"broken row without tabs")
    path = tmp_path / "in.tsv"
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


@pytest.fixture
def no_cjk_font(monkeypatch):
    monkeypatch.setattr(an, "matplotlib_cjk_family", lambda: None)


def test_length_histogram_matches_numpy():
    values = np.random.default_rng(0).integers(0, 90, size=501)
    hist = LengthHistogram()
    for v in values:
        hist.add(int(v))
    assert hist.n == 501
    assert math.isclose(hist.mean(), values.mean()) and math.isclose(hist.std(), values.std())
    for q in (50, 90, 95, 99, 100):
        assert hist.percentile(q) == int(np.percentile(values, q, method="inverted_cdf"))
    lo, hi = hist.ksigma_bounds(2)
    assert math.isclose(lo, values.mean() - 2 * values.std()) and math.isclose(hi, values.mean() + 2 * values.std())
    assert hist.fraction_at_most(int(values.max())) == 1.0


def test_analyze_tsv(tsv, tmp_path, no_cjk_font, capsys):
    from paddle_caption.tokenizer import QWenVLTokenizer

    out = tmp_path / "report"
    summary = analyze(tsv, out, progress=False)
    assert summary["rows"] == 6 and summary["captions"] == 5
    assert summary["skipped_rows"] == {"wrong_column_count": 1}
    chars = [len(c) for c in CAPTIONS]
    assert summary["caption_chars"]["max"] == max(chars) and summary["caption_chars"]["p50"] == sorted(chars)[2]
    tok = QWenVLTokenizer.from_pretrained(None)
    tokens = sorted(len(tok.encode(c)) for c in CAPTIONS)
    report = summary["tokens"]
    assert report["source"] == "qwen_tokenizer"
    assert report["caption_tokens"]["max"] == tokens[-1]
    assert report["generated_tokens_with_end_token"]["p50"] == tokens[2] + 1
    assert report["fraction_covered"] == 1.0 and report["max_new_tokens"] == 128
    assert summary["image_width"]["max"] == 100 and summary["image_height"]["min"] == 40
    assert summary["style_phrases"] == {"卡通风格": 3, "写实风格": 1}
    assert summary["captions_without_style_phrase"] == 1
    dup = summary["duplicates"]
    assert dup["distinct_captions"] == 3 and dup["captions_occurring_more_than_once"] == 1
    assert dup["rows_with_an_earlier_identical_caption"] == 2
    assert dup["most_repeated"][0] == {"caption": CARTOON, "count": 3}
    # Without a CJK font the plots use ASCII labels, and say so.
    assert summary["plot_font"] == "ascii-labels"
    assert summary["plot_labels"] == {"卡通风格": "cartoon", "写实风格": "realistic"}
    assert "no font with Chinese glyphs found" in capsys.readouterr().out

    for name in ("caption_length.png", "image_size.png", "style_frequency.png", "duplicate_captions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "summary.txt").read_text(encoding="utf-8")
    assert "max_new_tokens 128 covers 100.00% of captions" in text and "cartoon=卡通风格" in text
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["rows"] == 6


def test_analyze_records_jsonl_and_character_fallback(tsv, tmp_path, no_cjk_font):
    convert(tsv, tmp_path / "conv", CleanConfig(), RunOptions(workers=1, progress=False))
    summary = analyze(tmp_path / "conv" / "records.jsonl", tmp_path / "report", tokenizer=None, progress=False)
    assert summary["rows"] == 4  # the broken row and the style-less caption were dropped by the converter
    assert summary["style_phrases"] == {"卡通风格": 3, "写实风格": 1}
    assert summary["tokens"]["source"] == "characters"
    assert summary["tokens"]["caption_tokens"] == summary["caption_chars"]
    assert summary["image_width"]["max"] == 100 and summary["image_height"]["min"] == 40  # from the records


def test_style_phrases_and_ascii_labels():
    assert style_phrase(CARTOON) == "卡通风格"
    assert style_phrase("这是一张 水彩风格的图，3D风格") == "水彩风格"
    assert style_phrase(NO_STYLE) is None
    assert an.ascii_labels(["卡通风格", "3D风格", "赛博风格", "xyz风格".replace("风格", ""), "蒸汽风格"]) == {
        "卡通风格": "cartoon", "3D风格": "3D", "赛博风格": "style-1", "xyz": "xyz", "蒸汽风格": "style-2"}


def test_plots_use_a_font_that_draws_the_style_words():
    """The pinned paperang-p2-fonts-cjk package guarantees a CJK font: the plots' labels are Chinese."""
    from paddle_caption.fonts import find_cjk_font, font_covers

    family = an.matplotlib_cjk_family()
    assert family == "WenQuanYi Micro Hei"
    assert font_covers(find_cjk_font(), "卡通风格写实风格像素风格水彩风格黑白简笔风格3D风格")


def test_analyze_errors(tsv, tmp_path):
    with pytest.raises(UserError, match="missing.tsv"):
        analyze(tmp_path / "missing.tsv", tmp_path / "r", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        analyze(tsv, tmp_path / "file", progress=False)
