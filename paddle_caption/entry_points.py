"""The kit's commands, by name: console scripts (setup.py) and `python -m paddle_caption COMMAND`.

Each command is a module with `main(argv)`; `run_cli` turns a UserError into a one-line message
and exit status 2. The repository's top-level scripts (`supervised_finetune.py`, `predict_batch.py`,
`tools/*.py`) call the same mains under the contest workflow's names.
"""
from __future__ import annotations

import importlib
import sys

from .runtime import run_cli

COMMANDS = {
    "convert": ("paddle_caption.data.convert", "clean a contest TSV into records.jsonl (+ rejects ledger)"),
    "make-data": ("paddle_caption.data.synthetic", "write the synthetic ad-image dataset"),
    "analyze": ("paddle_caption.data.analyze", "dataset statistics and plots"),
    "train": ("paddle_caption.train.cli", "supervised fine-tuning from a JSON config"),
    "merge": ("paddle_caption.train.merge", "merge trained local parameters / LoRA into a model directory"),
    "predict": ("paddle_caption.predict.cli", "caption a test TSV for submission"),
    "evaluate": ("paddle_caption.eval.evaluate", "CIDEr-D, BLEU, ROUGE-L of results against references"),
    "demo": ("paddle_caption.demo.pipeline", "the whole workflow on the embedded default"),
    "serve": ("paddle_caption.serve.cli", "the caption service: HTTP API and web page"),
    "plan-memory": ("paddle_caption.train.memory_plan", "GPU memory a training config needs, per GPU"),
    "convert-checkpoint": ("paddle_caption.model.convert_checkpoint",
                           "PaddleMIX / Hugging Face Qwen-VL weights -> a safetensors model directory"),
    "compare-modes": ("paddle_caption.demo.compare_modes", "full / partial / LoRA fine-tuning compared on the embedded default"),
    "curate": ("paddle_caption.curate.cli", "run a data-curation recipe (filters, dedup, consistency, pseudo-labels)"),
    "curate-demo": ("paddle_caption.curate.demo", "raw noisy rows vs curated rows on the synthetic world"),
    "gpu-check": ("paddle_caption.gpu_check.cli", "one-minute self-check of the bfloat16 GPU paths against float32"),
}


def run(command: str, argv=None) -> int:
    module, _ = COMMANDS[command]
    return run_cli(importlib.import_module(module).main, argv)


def dispatch(argv=None) -> int:
    """`python -m paddle_caption COMMAND [args]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m paddle_caption COMMAND [args]\n\ncommands:", file=sys.stderr)
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<13} {summary}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return run(argv[0], argv[1:])


def _console(command: str):
    def entry() -> None:
        sys.exit(run(command))

    entry.__name__ = command.replace("-", "_")
    return entry


convert = _console("convert")
make_data = _console("make-data")
analyze = _console("analyze")
train = _console("train")
merge = _console("merge")
predict = _console("predict")
evaluate = _console("evaluate")
demo = _console("demo")
serve = _console("serve")
plan_memory = _console("plan-memory")
convert_checkpoint = _console("convert-checkpoint")
compare_modes = _console("compare-modes")
curate = _console("curate")
curate_demo = _console("curate-demo")
gpu_check = _console("gpu-check")
