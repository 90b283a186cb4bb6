"""Field accuracy on hand-made synthetic captions, and the evaluate tool (files, CLI, errors)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_caption.eval.cli import evaluate_main as main
from paddle_caption.eval.evaluate import evaluate_files, read_references
from paddle_caption.eval.fields import field_accuracy
from paddle_caption.runtime import UserError

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Field accuracy

FIELD_REFS = {
    "r1": "卡通风格。图片中间是一个红色的圆形，背景是白色。",
    "r2": "水彩风格。图片左边是一个蓝色的五角星，右边是一个黄色的菱形，背景是米色。",
    "r3": "黑白简笔风格。图片左边是一个三角形，右边是一个圆形，背景是白色。",
    "r4": "3D风格。图片中间是一个紫色的正方形，背景是黑色。",
    "r5": "一张普通的广告图片",  # not the synthetic grammar: counted only by exact and parse_rate
    "r6": "像素风格。图片中间是一个橙色的菱形，背景是灰色。",
}
FIELD_PREDS = {
    "r1": "卡通风格。图片中间是一个绿色的圆形，背景是白色。",  # colour wrong
    "r2": "卡通风格。图片左边是一个蓝色的五角星，右边是一个红色的圆形，背景是米色。",  # style, 2nd object wrong
    "r3": "黑白简笔风格。图片中间是一个三角形，背景是白色。",  # one object instead of two
    "r4": "乱七八糟",  # does not parse
    "r5": "",
    "r6": " 像素风格。图片中间是一个橙色的菱形，背景是灰色。\n",  # exact (whitespace ignored)
}


def test_field_accuracy_hand_computed():
    acc = field_accuracy(FIELD_PREDS, FIELD_REFS)
    # Five references parse (r5 does not).
    # background: r1 ok, r2 ok, r3 ok, r4 unparseable, r6 ok            -> 4/5
    # style:      r1 ok, r2 wrong, r3 ok, r4 unparseable, r6 ok          -> 3/5
    # count:      r1 ok, r2 ok, r3 1 vs 2, r4 unparseable, r6 ok         -> 3/5
    # colour (reference objects with a colour: r1 1, r2 2, r4 1, r6 1 = 5):
    #   r1 green vs red no; r2 blue yes, red vs yellow no; r4 no; r6 yes -> 2/5
    # shape (all reference objects: 1 + 2 + 2 + 1 + 1 = 7):
    #   r1 yes; r2 star yes, circle vs diamond no; r3 triangle yes, 2nd object missing no;
    #   r4 no; r6 yes                                                     -> 4/7
    # exact: only r6 of the 6 ids -> 1/6;  parse_rate: r1, r2, r3, r6 parse -> 4/6
    assert acc == {
        "background": 4 / 5, "style": 3 / 5, "object_count": 3 / 5, "colour": 2 / 5,
        "shape": 4 / 7, "exact": 1 / 6, "parse_rate": 4 / 6, "n": 6, "n_parsed_refs": 5,
    }


def test_field_accuracy_line_art_prediction_has_no_colour():
    refs = {"a": "写实风格。图片中间是一个红色的圆形，背景是白色。"}
    preds = {"a": "黑白简笔风格。图片中间是一个圆形，背景是白色。"}
    acc = field_accuracy(preds, refs)
    assert acc["colour"] == 0.0  # the predicted object names no colour: wrong
    assert acc["shape"] == 1.0
    assert acc["style"] == 0.0
    assert acc["background"] == 1.0


def test_field_accuracy_no_colour_references_gives_none():
    refs = {"a": "黑白简笔风格。图片中间是一个圆形，背景是白色。"}
    acc = field_accuracy(dict(refs), refs)
    assert acc["colour"] is None
    assert acc["exact"] == acc["shape"] == 1.0


def test_field_accuracy_errors():
    with pytest.raises(ValueError, match="no prediction"):
        field_accuracy({}, {"a": FIELD_REFS["r1"]})
    with pytest.raises(ValueError, match="synthetic-ad grammar"):
        field_accuracy({"a": "x"}, {"a": "一张图片"})


# ---------------------------------------------------------------------------------------------
# evaluate_files and the CLI


def write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


A_TEXT = "卡通风格。图片中间是一个红色的圆形，背景是白色。"
B_TEXT = "水彩风格。图片中间是一个蓝色的菱形，背景是灰色。"
C_TEXT = "像素风格。图片中间是一个黄色的五角星，背景是黑色。"


@pytest.fixture
def files(tmp_path):
    """a and b predicted exactly, c empty, one reference each."""
    results = write(tmp_path / "results.txt", [f"a\t{A_TEXT}", f"b\t{B_TEXT}", "c\t"])
    refs = write(tmp_path / "refs.tsv", [f"a\t{A_TEXT}", f"b\t{B_TEXT}", f"c\t{C_TEXT}"])
    return results, refs


def hand_computed_char_scores() -> dict:
    """The scores of `files` in character mode, from the metrics' definitions alone.

    CIDEr-D: a candidate equal to its only reference has identical tf-idf vectors (cosine 1 for each
    n, no length penalty), so 10 each; the empty candidate scores 0. BLEU-4: every candidate n-gram
    matches (precision 1), and the corpus brevity penalty is exp(1 - r / c) with c the candidate
    characters and r the reference characters. ROUGE-L: F = 1 for a and b, 0 for c.
    """
    chars = [sum(1 for ch in text if ch not in "。，") for text in (A_TEXT, B_TEXT, C_TEXT)]
    candidate, reference = chars[0] + chars[1], sum(chars)
    return {"CIDEr-D": 20 / 3, "BLEU-4": math.exp(1 - reference / candidate), "ROUGE-L": 2 / 3}


def test_evaluate_files_gives_the_hand_computed_scores(files):
    results, refs = files
    scores = evaluate_files(results, refs, mode="char")
    assert scores["n"] == 3 and scores["mode"] == "char"
    for key, value in hand_computed_char_scores().items():
        assert scores[key] == pytest.approx(value, rel=1e-6), key


def test_several_references_per_id(tmp_path):
    results = write(tmp_path / "results.txt", [f"a\t{A_TEXT}", f"b\t{B_TEXT}"])
    refs = write(tmp_path / "refs.tsv", [f"a\t{C_TEXT}", f"a\t{A_TEXT}", f"b\t{B_TEXT}"])
    assert read_references(refs) == {"a": [C_TEXT, A_TEXT], "b": [B_TEXT]}
    scores = evaluate_files(results, refs, mode="char")
    assert scores["ROUGE-L"] == pytest.approx(1.0)  # per image, the best reference counts
    assert scores["BLEU-4"] == pytest.approx(1.0, rel=1e-6)  # the closest reference length is exact


def test_references_accept_three_column_rows(tmp_path):
    refs = write(tmp_path / "val.tsv", ["x\tQUJD\t卡通风格。图片中间是一个红色的圆形，背景是白色。",
                                        "y\tREVG\t像素风格。图片中间是一个黄色的五角星，背景是黑色。"])
    assert read_references(refs) == {"x": ["卡通风格。图片中间是一个红色的圆形，背景是白色。"],
                                      "y": ["像素风格。图片中间是一个黄色的五角星，背景是黑色。"]}


def test_cli_writes_json_and_table(files, capsys):
    results, refs = files
    assert main([str(results), str(refs), "--mode", "char"]) == 0
    out = capsys.readouterr().out
    expected = hand_computed_char_scores()
    assert f"CIDEr-D | {expected['CIDEr-D']:.4f}" in out and "images  | 3" in out
    saved = json.loads((results.parent / "results.scores.json").read_text(encoding="utf-8"))
    assert saved["mode"] == "char" and saved["results"] == str(results) and saved["refs"] == str(refs)
    for key, value in expected.items():
        assert saved[key] == pytest.approx(value, rel=1e-6), key


def test_cli_fields_and_explicit_json(tmp_path, capsys):
    results = write(tmp_path / "pred.txt", [f"{k}\t{v.strip()}" for k, v in FIELD_PREDS.items()])
    refs = write(tmp_path / "refs.tsv", [f"{k}\t{v}" for k, v in FIELD_REFS.items()])
    out_json = tmp_path / "out" / "s.json"
    assert main([str(results), str(refs), "--fields", "--json", str(out_json)]) == 0
    assert "field colour" in capsys.readouterr().out
    saved = json.loads(out_json.read_text(encoding="utf-8"))
    assert saved["fields"]["colour"] == pytest.approx(2 / 5)
    assert saved["fields"]["exact"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("results_lines, refs_lines, message", [
    (["a\tx", "b\ty"], ["a\tx", "b\ty", "c\tz", "d\tw"], "2 ids of .*refs.tsv have no prediction .*first: c, d"),
    (["a\tx", "b\ty", "e\tz"], ["a\tx", "b\ty"], "1 ids of .*results.txt have no reference .*first: e"),
    (["a\tx", "a\ty"], ["a\tx"], r"results.txt:2: duplicate id 'a'"),
    (["a\tx\tz"], ["a\tx"], r"results.txt:1: expected 'id<TAB>caption', got 3"),
    (["a\tx"], ["a\tx", "", "b"], r"refs.tsv:3: expected .* got 1 column"),
    (["a\tx"], ["a\t"], r"refs.tsv:1: empty reference caption"),
    (["a\tx"], ["a\t" + "QUJD" * 200], r"refs.tsv:1: the caption column holds base64"),
])
def test_evaluate_errors(tmp_path, results_lines, refs_lines, message):
    results = write(tmp_path / "results.txt", results_lines)
    refs = write(tmp_path / "refs.tsv", refs_lines)
    with pytest.raises(UserError, match=message):
        evaluate_files(results, refs)


def test_fields_on_non_synthetic_references_is_a_user_error(tmp_path):
    results = write(tmp_path / "results.txt", ["a\t一张图片"])
    refs = write(tmp_path / "refs.tsv", ["a\t一张普通的图片"])
    with pytest.raises(UserError, match="synthetic-ad grammar"):
        evaluate_files(results, refs, fields=True)


def test_tool_fails_with_one_line_and_nonzero_exit(tmp_path):
    results = write(tmp_path / "results.txt", ["a\tx"])
    (tmp_path / "bad.tsv").write_bytes(b"a\t\xff\xfe\n")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), str(results),
                           str(tmp_path / "bad.tsv")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'bad.tsv'}:1: not valid UTF-8"]
    assert not (tmp_path / "results.scores.json").exists()


def test_muge_jsonl_references(tmp_path):
    """MUGE ECommerce-IC: `{"image_id", "text": [captions]}` lines, every caption a reference."""
    results = write(tmp_path / "results.txt", [f"a\t{A_TEXT}", f"b\t{B_TEXT}"])
    refs = write(tmp_path / "IC_valid.jsonl", [json.dumps({"image_id": "a", "text": [C_TEXT, A_TEXT]}, ensure_ascii=False),
                                               json.dumps({"image_id": "b", "text": [B_TEXT, ""]}, ensure_ascii=False)])
    assert read_references(refs) == {"a": [C_TEXT, A_TEXT], "b": [B_TEXT]}
    tsv = write(tmp_path / "refs.tsv", [f"a\t{C_TEXT}", f"a\t{A_TEXT}", f"b\t{B_TEXT}"])
    assert evaluate_files(results, refs, mode="char") == evaluate_files(results, tsv, mode="char")
    bad = write(tmp_path / "IC_bad.jsonl", ['{"image_id": "a", "text": [1]}'])
    with pytest.raises(UserError, match="IC_bad.jsonl:1"):
        read_references(bad)
