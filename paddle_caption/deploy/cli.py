"""`python tools/export_model.py MODEL_DIR OUT_DIR [--precision float32|bfloat16|int8]`: export a model
directory for Paddle Inference (see deploy/export.py for what OUT_DIR holds). Then
`predict_batch.py TEST.tsv RESULTS.txt OUT_DIR` and `paddle-caption-serve OUT_DIR` run it (an
exported directory selects `--engine inference`).

int8 calibrates on the first `--calibration_images` images of `--calibration TEST.tsv` (id<TAB>base64
rows, the predict_batch.py input).
"""
from __future__ import annotations

import argparse

from ..runtime import UserError, configure
from .predictors import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export_model.py", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("model_dir", help="config.json + model.safetensors [+ prompt.json, qwen.tiktoken, draft_datastore/]")
    p.add_argument("out_dir", help="the deployment directory to write (must not exist, unless --overwrite)")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="how Paddle Inference runs the graphs: float32, bfloat16 (oneDNN, CPUs with "
                        "AVX512-BF16 only) or int8 (post-training quantisation, needs --calibration)")
    p.add_argument("--calibration", help="int8: a TSV of id<TAB>base64-image rows to calibrate on")
    p.add_argument("--calibration_images", type=int, default=32, help="int8: how many images to calibrate on")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--num_threads", type=int, help="CPU threads (default: OMP_NUM_THREADS, else the core count)")
    return p


def calibration_images(path: str, count: int, image_size: int):
    """The first `count` usable images of an id<TAB>base64 TSV, preprocessed: [n, 3, S, S] float32."""
    import numpy as np

    from ..data.images import preprocess_image
    from ..predict.inputs import load_batch, read_test_rows

    if count < 1:
        raise UserError(f"--calibration_images must be >= 1, got {count}")
    rows = read_test_rows(path, count)
    with open(path, "rb") as handle:
        images, _ = load_batch(handle.fileno(), rows, lambda img: preprocess_image(img, image_size),
                               max_pixels=4096 * 4096, min_side=1)
    if not images:
        raise UserError(f"--calibration {path}: no usable image in its first {count} rows")
    return np.stack(list(images.values()))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.num_threads)
    from ..model.config import MgenVLConfig
    from .export import export_model

    calibration = None
    if args.precision == "int8":
        if not args.calibration:
            raise UserError("--precision int8 needs --calibration TEST.tsv (images to calibrate on)")
        size = MgenVLConfig.from_pretrained(args.model_dir).visual.image_size
        calibration = calibration_images(args.calibration, args.calibration_images, size)
    elif args.calibration:
        raise UserError("--calibration applies to --precision int8 only")
    export_model(args.model_dir, args.out_dir, args.precision, calibration, overwrite=args.overwrite, log=print)
    return 0
