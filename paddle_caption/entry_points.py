"""The kit's commands, by name: console scripts (setup.py) and `python -m paddle_caption COMMAND`.

Each command is a function `main(argv)` of its package's `cli.py` (`module:function` below); `run_cli` turns a UserError into a one-line message
and exit status 2. The repository's top-level scripts (`supervised_finetune.py`, `predict_batch.py`,
`tools/*.py`) call the same mains under the contest workflow's names.
"""
from __future__ import annotations

import importlib
import sys

from .runtime import run_cli

COMMANDS = {
    "convert": ("paddle_caption.data.cli:convert_main", "clean a contest TSV into records.jsonl (+ rejects ledger)"),
    "make-data": ("paddle_caption.data.synthetic.cli:main", "write the synthetic ad-image dataset"),
    "analyze": ("paddle_caption.data.cli:analyze_main", "dataset statistics and plots"),
    "train": ("paddle_caption.train.cli:main", "supervised fine-tuning from a JSON config"),
    "merge": ("paddle_caption.train.cli:merge_main", "merge trained local parameters / LoRA into a model directory"),
    "predict": ("paddle_caption.predict.cli:main", "caption a test TSV for submission"),
    "evaluate": ("paddle_caption.eval.cli:evaluate_main", "CIDEr-D, BLEU, ROUGE-L of results against references"),
    "demo": ("paddle_caption.demo.cli:demo_main", "the whole workflow on the embedded default"),
    "serve": ("paddle_caption.serve.cli:main", "the caption service: HTTP API and web page"),
    "plan-memory": ("paddle_caption.train.cli:plan_memory_main", "GPU memory a training config needs, per GPU"),
    "convert-checkpoint": ("paddle_caption.model.cli:convert_checkpoint_main",
                           "PaddleMIX / Hugging Face Qwen-VL weights -> a safetensors model directory"),
    "compare-modes": ("paddle_caption.demo.cli:compare_modes_main", "full / partial / LoRA fine-tuning compared on the embedded default"),
    "curate": ("paddle_caption.curate.cli:main", "run a data-curation recipe (filters, dedup, consistency, pseudo-labels)"),
    "curate-demo": ("paddle_caption.demo.cli:curate_demo_main", "raw noisy rows vs curated rows on the synthetic world"),
    "scst-demo": ("paddle_caption.demo.cli:scst_demo_main", "the demo model + cross-entropy vs + SCST (CIDEr-D)"),
    "export": ("paddle_caption.deploy.cli:main", "export a model directory for Paddle Inference (oneDNN)"),
    "gpu-check": ("paddle_caption.gpu_check.cli:main", "one-minute self-check of the bfloat16 GPU paths against float32"),
}


def command_main(command: str):
    """The `main(argv)` of a command, imported only when it runs (most commands import paddle)."""
    module, _, function = COMMANDS[command][0].partition(":")
    return getattr(importlib.import_module(module), function)


def run(command: str, argv=None) -> int:
    return run_cli(command_main(command), argv)


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
scst_demo = _console("scst-demo")
export = _console("export")
gpu_check = _console("gpu-check")
