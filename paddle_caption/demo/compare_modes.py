"""Fine-tune modes compared on the embedded default: full, partial (the upper half of the decoder)
and LoRA, on the same data under the same wall-clock budget.

    python tools/compare_modes.py --minutes 10          # or: make compare-modes MINUTES=10

Every stage is the demo's (`pipeline.Demo`: synthetic data, convert, `supervised_finetune.py`,
merge, `predict_batch.py`, scoring), run for three training runs of one config that differ only in
what trains:

- `full`: every parameter the config trains (the demo keeps the vision tower frozen, so do all three);
- `partial`: the 7B recipe's rule, LLM layers {L/2 .. L-1} (16-31 of 32; layer 1 of the tiny
  model's 2) with everything else frozen — embeddings, ln_f, lm_head and the vision tower, as in
  config/mgen_vl/sft_layers_16_31.json;
- `lora`: PaddleNLP LoRA on the baseline's targets (c_attn, attn c_proj, w1, w2 of every layer).

The runs train one after another, each alone on the machine, so the budget means the same for
each. The table (`results.md`) gives CIDEr-D and style accuracy on the test split, trainable
parameters, the training process's peak RSS, and steps done.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write
from .pipeline import Demo, DemoOptions, markdown_table

LABELS = {"full": "full", "partial": "partial (upper half of the decoder)", "lora": "LoRA"}


class CompareModes(Demo):
    name = "compare-modes"
    labels = LABELS
    concurrent_runs = 1  # one at a time: each mode gets the whole machine for its budget
    curve_title = "fine-tune modes, tiny Mgen-VL on the synthetic ad world"

    def __init__(self, opts: DemoOptions, modes=tuple(LABELS), lora_r: int = 8, lora_alpha: float = 16.0,
                 log=print):
        super().__init__(opts, log)
        from ..model.config import MgenVLConfig
        from ..train.config import resolve_path

        cfg = self.train_config
        layers = MgenVLConfig.from_pretrained(resolve_path(cfg.model_name_or_path or cfg.model_config)).num_hidden_layers
        upper = f"transformer.llm.h.{{{layers // 2}..{layers - 1}}}.*"
        every = {"full": ["--finetune_mode", "full"],
                 "partial": ["--finetune_mode", "partial", "--trainable", json.dumps([upper]),
                             "--frozen", "[]"],
                 "lora": ["--finetune_mode", "lora", "--lora_r", str(lora_r), "--lora_alpha", str(lora_alpha)]}
        self.runs = {mode: every[mode] for mode in modes}
        self.upper = upper

    def report(self, rows: dict) -> dict:
        table = modes_table(rows)
        minutes = self.opts.minutes if self.opts.minutes is not None else self.train_config.max_train_minutes
        self.log(f"\n[6/6] test split ({self.opts.n_test} images, jieba tokens), {minutes:g} min budget "
                 f"per mode; partial trains {self.upper}\n" + table)
        curve = self.write_curve()
        result = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.opts).items()},
                  "budget_minutes": minutes, "partial_trainable": self.upper, "table": table,
                  "runs": {run: {k: rows[run][k] for k in ("label", "scores", "train", "peak_rss_mb")}
                           for run in self.runs}}
        with atomic_write(self.out / "results.json") as handle:
            json.dump(result, handle, indent=2, ensure_ascii=False)
        with atomic_write(self.out / "results.md") as handle:
            handle.write(f"{minutes:g} min budget per mode, {self.opts.n_train} training images\n\n" + table + "\n")
        self.log(f"\nwrote {self.out / 'results.md'}, {self.out / 'results.json'}, {curve}")
        return result


def modes_table(rows: dict) -> str:
    """mode | trainable parameters | CIDEr-D | style | background | steps | train min | peak RSS."""
    header = ["mode", "trainable params", "CIDEr-D", "style", "background", "steps", "train min", "peak RSS MB"]
    lines = []
    for run, row in rows.items():
        scores, train = row["scores"], row["train"]
        fields = scores.get("fields", {})
        percent = lambda key: "n/a" if fields.get(key) is None else f"{fields[key]:.0%}"  # noqa: E731
        trainable = train.get("trainable_parameters")
        lines.append([row.get("label", run), "n/a" if trainable is None else f"{trainable:,}",
                      f"{scores['CIDEr-D']:.3f}", percent("style"), percent("background"), str(train["steps"]),
                      f"{train['train_seconds'] / 60:.1f}",
                      "n/a" if row.get("peak_rss_mb") is None else f"{row['peak_rss_mb']:.0f}"])
    return markdown_table(header, lines)
