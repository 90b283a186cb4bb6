"""The one-command demo: the results table and bar logic, and the whole pipeline end to end (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_caption.demo.pipeline import bar_checks, results_table

ROOT = Path(__file__).resolve().parents[1]


def row(cider, background, style, steps=10):
    fields = {"background": background, "style": style, "colour": 0.5, "shape": None, "exact": 0.0}
    return {"scores": {"CIDEr-D": cider, "BLEU-4": 0.1, "ROUGE-L": 0.2, "fields": fields},
            "train": {"steps": steps, "samples": steps * 8, "train_seconds": 90.0}}


def test_results_table_shows_both_models_side_by_side():
    table = results_table({"image": row(4.5, 1.0, 0.75), "no_image": row(1.2, 0.5, 0.2)}).splitlines()
    assert len(table) == 4
    assert table[0].startswith("| model") and "CIDEr-D" in table[0] and "style" in table[0]
    assert "with images" in table[2] and "4.500" in table[2] and "75%" in table[2]
    assert "no-image ablation" in table[3] and "1.200" in table[3] and "n/a" in table[3]
    assert "1.5" in table[2]  # training minutes


def test_bar_checks_pass_and_miss():
    ok = bar_checks({"image": row(4.5, 1.0, 0.75), "no_image": row(1.2, 0.5, 0.2)})
    assert all(check["pass"] for check in ok["bar"].values())
    assert ok["bar"]["cider_ratio"]["value"] == pytest.approx(3.75)
    miss = bar_checks({"image": row(3.0, 0.9, 0.75), "no_image": row(1.2, 0.5, 0.2)})
    assert not miss["bar"]["cider_ratio"]["pass"] and not miss["bar"]["background"]["pass"]
    assert miss["bar"]["style"]["pass"]
    assert sum(line.startswith("MISS") for line in miss["lines"]) == 2


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "tools/run_demo.py", "--config", "config/demo.json", "--out", str(out),
           "--train", "48", "--val", "8", "--test", "10", "--max-steps", "6", "--minutes", "3",
           "--max-new-tokens", "12", "--batch-size", "4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("results.md", "results.json", "caption_grid.png", "learning_curve.png",
                 "train/records.jsonl", "train/rejects.tsv", "data/test_refs.tsv"):
        assert (out / name).is_file(), name
    test_ids = [line.split("\t")[0] for line in (out / "data/test.tsv").read_text().splitlines()]
    assert len(test_ids) == 10
    for run in ("image", "no_image"):
        assert (out / run / "model" / "config.json").is_file()
        assert (out / run / "final" / "local_params.safetensors").is_file()
        lines = (out / run / "results.txt").read_text(encoding="utf-8").splitlines()
        assert [line.split("\t")[0] for line in lines] == test_ids, run
        summary = json.loads((out / run / "train_summary.json").read_text())
        assert summary["steps"] == 6
    result = json.loads((out / "results.json").read_text())
    assert set(result["runs"]) == {"image", "no_image"}
    assert "with images" in done.stdout and "no-image ablation" in done.stdout
    # a second run finds every stage done and only re-reports
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "exists, kept" in again.stdout
