"""The model commands' command lines: `convert-checkpoint` (tools/convert_checkpoint.py)."""
from __future__ import annotations

import argparse

from . import import_weights


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=import_weights.__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="PaddleMIX or Hugging Face Qwen-VL model directory")
    parser.add_argument("dst", help="output model directory (must not exist or be empty)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="weights dtype of DST (default: the source's)")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read a Paddle pickle that names more than arrays with Paddle's own unpickler "
                             "(arrays-only .pdparams and PyTorch .bin need no flag); only for files you trust")
    parser.add_argument("--max_shard_gb", type=float, default=2.0, help="safetensors shard size (GiB)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser.parse_args(argv)


def convert_checkpoint_main(argv=None) -> int:
    args = parse_args(argv)
    from ..runtime import configure

    configure()
    import_weights.convert(args.src, args.dst, dtype=args.dtype, allow_pickle=args.allow_pickle,
            max_shard_bytes=int(args.max_shard_gb * (1 << 30)), progress=args.progress)
    return 0
