"""The training commands' command lines: `train` (`main`), `merge` and `plan-memory`.

`python supervised_finetune.py CONFIG.json [--key value ...] [--resume]` (`main`):

The config is parsed and checked (unknown keys, wrong types) before paddle is imported, so a typo
costs a second, not a model load. A run auto-resumes from the newest complete checkpoint in its
output_dir; `--resume` additionally insists that there is one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..model.precision import DTYPES
from ..runtime import UserError
from . import memory_plan
from . import merge as merge_module

USAGE = "usage: supervised_finetune.py CONFIG.json [--key value ...] [--resume]"


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        print("Every TrainConfig field can be overridden; see paddle_caption/train/config.py.")
        return 0 if args else 2
    config_path, rest = args[0], args[1:]
    require_resume = "--resume" in rest
    rest = [a for a in rest if a != "--resume"]
    from .config import TrainConfig

    cfg = TrainConfig.load(config_path, rest)
    from .run_checkpoints import latest_checkpoint

    if require_resume and latest_checkpoint(Path(cfg.output_dir)) is None:
        raise UserError(f"--resume: no complete checkpoint in {cfg.output_dir}")
    from .trainer import Trainer

    Trainer(cfg).train()
    return 0


# ---- merge (tools/merge_local_params.py) -------------------------------------------------------
def parse_merge_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=merge_module.__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True,
                        help="base model directory, or the architecture JSON of a from-scratch run")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--local_path", help="checkpoint (or output_dir) of a partial/full run")
    source.add_argument("--lora_path", help="checkpoint (or output_dir) of a LoRA run, or a LoRA dir")
    parser.add_argument("--merge_model_path", required=True, help="output model directory")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="read a Paddle pickle that names more than arrays with Paddle's own unpickler "
                             "(arrays-only .pdparams and PyTorch .bin need no flag); only for files you trust")
    parser.add_argument("--max_shard_gb", type=float, default=2.0, help="safetensors shard size")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="dtype of the merged model (default: the base model's; float32 for a "
                             "from-scratch architecture)")
    return parser.parse_args(argv)


def merge_main(argv=None) -> int:
    args = parse_merge_args(argv)
    from ..runtime import configure
    from .merge import merge

    configure()
    merge(args.model_name_or_path, Path(args.merge_model_path), local_path=args.local_path,
          lora_path=args.lora_path, allow_pickle=args.allow_pickle,
          max_shard_bytes=int(args.max_shard_gb * (1 << 30)), dtype=args.dtype)
    return 0


# ---- plan-memory (tools/plan_memory.py) ---------------------------------------------------------
def parse_plan_memory_args(argv=None):
    parser = argparse.ArgumentParser(description=memory_plan.__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="plan_memory.py CONFIG [CONFIG ...] [options] [--key value ...]")
    parser.add_argument("configs", nargs="+", help="training config JSON file(s)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per run (data parallel or sharded)")
    parser.add_argument("--gpu_memory", type=float, default=80.0, help="memory of one card, GiB")
    parser.add_argument("--model_config", help="architecture JSON to use instead of the config's model "
                        "(e.g. config/model/qwen-vl-chat-7b.json when model_name_or_path is not here)")
    parser.add_argument("--answer_tokens", type=int, help="supervised tokens per sample "
                        "(default: the config's eval_max_new_tokens + 1)")
    parser.add_argument("--attention", choices=("flash", "eager"), default="flash",
                        help="flash: a GPU in bfloat16/float16; eager: probabilities kept (CPU, float32)")
    parser.add_argument("--markdown", action="store_true", help="one markdown table row per recipe and GPU layout")
    args, overrides = parser.parse_known_args(argv)
    if args.gpus < 1 or args.gpu_memory <= 0:
        raise UserError("--gpus must be >= 1 and --gpu_memory > 0")
    return args, overrides


def plan_memory_main(argv=None) -> int:
    from ..runtime import configure
    from .config import TrainConfig
    from .memory_plan import load_model_config, make_plan
    from .memory_report import MARKDOWN_HEADER, format_report, markdown_rows

    args, overrides = parse_plan_memory_args(argv)
    configure()
    outputs = [MARKDOWN_HEADER.format(mem=args.gpu_memory)] if args.markdown else []
    for source in args.configs:
        cfg = TrainConfig.load(source, overrides)
        config, model_source = load_model_config(cfg, args.model_config)
        plan = make_plan(config, cfg, args.answer_tokens, args.attention)
        if args.markdown:
            outputs += markdown_rows(plan, Path(source).stem, args.gpus, args.gpu_memory)
        else:
            outputs.append(format_report(plan, cfg, source, model_source, args.gpus, args.gpu_memory))
    print(("\n" if args.markdown else "\n\n").join(outputs))
    return 0
