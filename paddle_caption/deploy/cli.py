"""`python tools/export_model.py MODEL_DIR OUT_DIR [--precision float32|bfloat16]`: export a model
directory for Paddle Inference (see deploy/export.py for what OUT_DIR holds). Then
`predict_batch.py TEST.tsv RESULTS.txt OUT_DIR` and `paddle-caption-serve OUT_DIR` run it (an
exported directory selects `--engine inference`). `--precision int8` is refused in one line (why:
docs/deployment.md).
"""
from __future__ import annotations

import argparse

from ..runtime import configure
from .predictors import PRECISIONS

PRECISION_CHOICES = PRECISIONS + ("int8",)  # int8 is named so that its refusal explains itself


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export_model.py", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("model_dir", help="config.json + model.safetensors [+ prompt.json, qwen.tiktoken, draft_datastore/]")
    p.add_argument("out_dir", help="the deployment directory to write (must not exist, unless --overwrite)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="float32",
                   help="how Paddle Inference runs the graphs: float32 or bfloat16 (oneDNN, CPUs with "
                        "AVX512-BF16 only); int8 is refused (docs/deployment.md)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--num_threads", type=int, help="CPU threads (default: OMP_NUM_THREADS, else the core count)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.num_threads)
    from .export import export_model

    export_model(args.model_dir, args.out_dir, args.precision, overwrite=args.overwrite, log=print)
    return 0
