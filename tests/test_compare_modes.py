"""tools/compare_modes.py: which parameters each mode trains, the table, and the pipeline end to end (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paddle_caption.demo.compare_modes import CompareModes, modes_table
from paddle_caption.demo.pipeline import DemoOptions

from .conftest import micro_model_json

ROOT = Path(__file__).resolve().parents[1]


def test_partial_is_the_upper_half_of_the_decoder_whatever_its_depth(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model_config": str(micro_model_json(tmp_path, num_hidden_layers=4)),
                                  "train_records": "r.jsonl", "max_steps": 1}))
    compare = CompareModes(DemoOptions(config=config, out=tmp_path / "out"), modes=("partial", "lora"),
                           lora_r=4, log=lambda *_: None)
    assert list(compare.runs) == ["partial", "lora"]
    assert compare.runs["partial"][:4] == ["--finetune_mode", "partial", "--trainable", '["transformer.llm.h.{2..3}.*"]']
    assert compare.runs["lora"] == ["--finetune_mode", "lora", "--lora_r", "4", "--lora_alpha", "16.0"]


def test_modes_table_lists_what_the_issue_asks_for():
    def row(label, cider, style, trainable, rss):
        return {"label": label, "scores": {"CIDEr-D": cider, "fields": {"style": style, "background": 0.5}},
                "train": {"steps": 12, "train_seconds": 600.0, "trainable_parameters": trainable},
                "peak_rss_mb": rss}

    table = modes_table({"full": row("full", 4.2, 0.7, 19530432, 1056.4),
                         "lora": row("LoRA", 0.5, None, 12288, None)}).splitlines()
    assert "trainable params" in table[0] and "CIDEr-D" in table[0] and "peak RSS MB" in table[0]
    assert "19,530,432" in table[2] and "4.200" in table[2] and "70%" in table[2] and "1056" in table[2]
    assert "12,288" in table[3] and "n/a" in table[3] and "10.0" in table[3]


@pytest.mark.slow
def test_compare_modes_end_to_end(tmp_path):
    out = tmp_path / "compare"
    cmd = [sys.executable, "tools/compare_modes.py", "--out", str(out), "--train", "24", "--val", "4",
           "--test", "4", "--max-steps", "2", "--minutes", "2", "--max-new-tokens", "6", "--batch-size", "4"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "results.json").read_text())
    assert list(result["runs"]) == ["full", "partial", "lora"]
    trainable = {mode: run["train"]["trainable_parameters"] for mode, run in result["runs"].items()}
    assert trainable["full"] > trainable["partial"] > trainable["lora"] > 0
    for mode, run in result["runs"].items():
        assert run["train"]["steps"] == 2 and run["peak_rss_mb"] > 100, mode
        assert (out / mode / "model" / "config.json").is_file()
    assert (out / "lora/final/lora").is_dir() and (out / "partial/final/local_params.safetensors").is_file()
    assert "| full" in (out / "results.md").read_text()
