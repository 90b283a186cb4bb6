"""Console scripts (setup.py): each wraps a command's `main` in `run_cli`, so errors are one line."""
from __future__ import annotations

import importlib
import sys

from .runtime import run_cli


def _run(module: str) -> None:
    sys.exit(run_cli(importlib.import_module(module).main))


def convert() -> None:
    _run("paddle_caption.data.convert")


def make_data() -> None:
    _run("paddle_caption.data.synthetic")


def analyze() -> None:
    _run("paddle_caption.data.analyze")


def train() -> None:
    _run("paddle_caption.train.cli")


def merge() -> None:
    _run("paddle_caption.train.merge")


def predict() -> None:
    _run("paddle_caption.serve.predict")


def evaluate() -> None:
    _run("paddle_caption.eval.evaluate")


def demo() -> None:
    _run("paddle_caption.demo.pipeline")


def plan_memory() -> None:
    _run("paddle_caption.train.memory_plan")


def convert_checkpoint() -> None:
    _run("paddle_caption.model.convert_checkpoint")
