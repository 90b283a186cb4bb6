"""`python -m paddle_caption gpu-check [--dtype bfloat16] [--workdir DIR] [--keep]`.

On a GPU machine: the items of `checks.py` in order — environment and versions, the fused attention
kernel, data-parallel training on every visible GPU (`paddle.distributed.launch --gpus 0,...,N-1`)
against a float32 run, and batched greedy decoding against float32 — one PASS/FAIL line each and
a summary; exit 0 when everything passed, 1 otherwise. Takes about a minute (the tiny model, 6
steps). Without a GPU it refuses in one line: what it checks cannot be checked on a CPU.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ..runtime import UserError, configure

NO_GPU = ("gpu-check needs a CUDA GPU: this Paddle sees none ({versions}); the CPU-provable parts run "
          "in the test suite (make test)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paddle-caption gpu-check", description=__doc__.split("\n\n")[1])
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="the precision checked against float32 (the 7B recipes train in bfloat16)")
    parser.add_argument("--model_config", default="config/model/tiny.json", help="architecture to check")
    parser.add_argument("--workdir", default=None, help="where data and runs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser


def run_checks(workdir: Path, model_config: str, dtype: str, device: str, launch_args: list[str], ranks: int,
               log=print) -> list:
    """Every item on `device` ("gpu" or "cpu": the CPU form is what the tests run, in float32),
    printed as it completes; returns the items. An item that raises is a FAIL with its error."""
    from . import checks

    paddle = configure()
    paddle.set_device("gpu:0" if device == "gpu" else "cpu")
    items = []

    def record(new):
        for item in new:
            items.append(item)
            log(item.line())

    def attempt(name, fn):
        try:
            return fn()
        except Exception as err:  # a failing item is reported, and the others still run
            record([checks.Item(name, False, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")])
            return None

    record([checks.environment(dtype)])
    attempt("attention", lambda: record(checks.attention(dtype)))
    trained = attempt("training", lambda: checks.training(workdir, model_config, dtype, launch_args, ranks))
    if trained is not None:
        record(trained[0])
        model_dir = attempt("decoding", lambda: checks.trained_model_dir(trained[1], model_config))
        if model_dir is not None:
            attempt("decoding", lambda: record(checks.decoding(model_dir, dtype)))
    return items


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import checks
    from ..resources import find_file

    configure()
    gpus = checks.gpu_count()
    if gpus == 0:
        raise UserError(NO_GPU.format(versions=checks.versions()))
    model_config = find_file(args.model_config, "--model_config")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="paddle-caption-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        items = run_checks(workdir, str(model_config), args.dtype, "gpu",
                           ["--gpus", ",".join(map(str, range(gpus)))], gpus)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [i for i in items if not i.passed]
    print(f"gpu-check: {len(items) - len(failed)} of {len(items)} items passed in {time.time() - start:.0f} s"
          + (f"; FAILED: {', '.join(i.name for i in failed)}" if failed else ""))
    return 1 if failed else 0
