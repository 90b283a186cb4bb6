"""`python tools/curate.py RECIPE [options]`: run a curation recipe (see paddle_caption/curate/recipe.py).

Writes EXPORT_DIR/records.jsonl (training-ready: supervised_finetune.py's train_records), ledger.jsonl
(every dropped row with its reason and score), summary.json, report.md and PNG plots; rerunning
resumes at the first stage not done. Model operations shard across processes under
`python -m paddle.distributed.launch --nproc_per_node N tools/curate.py RECIPE` (or --rank/--world_size).
"""
from __future__ import annotations

import argparse

from ..distributed import rank_and_world
from ..runtime import UserError, configure


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curate.py", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("recipe", nargs="?", help="recipe JSON: dataset, export_dir, model_dir, process: [{op: {params}}]")
    p.add_argument("--export_dir", help="overrides the recipe's export_dir")
    p.add_argument("--dataset", help="overrides the recipe's dataset")
    p.add_argument("--model_dir", help="overrides the recipe's model_dir")
    p.add_argument("--engine", choices=("dygraph", "inference"),
                   help="overrides the recipe's engine (default: what each model_dir holds; an exported "
                        "directory runs on Paddle Inference)")
    p.add_argument("--batch_size", type=int, help="overrides the recipe's batch_size")
    p.add_argument("--num_threads", type=int, help="CPU threads (default: the recipe's, else every core)")
    p.add_argument("--rank", type=int, help="this process's shard (default: PADDLE_TRAINER_ID or 0)")
    p.add_argument("--world_size", type=int, help="number of processes (default: PADDLE_TRAINERS_NUM or 1)")
    p.add_argument("--list_ops", action="store_true", help="list the operations and exit")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .ops import OPS
    from .recipe import load_recipe
    from .runner import curate

    if args.list_ops:
        for name, cls in sorted(OPS.items()):
            print(f"{name:<28} {(cls.__doc__ or '').strip().partition(chr(10))[0]}")
        return 0
    if not args.recipe:
        raise UserError("give a recipe (or --list_ops)")
    overrides = {k: getattr(args, k) for k in ("export_dir", "dataset", "model_dir", "engine", "batch_size", "num_threads")
                 if getattr(args, k) is not None}
    recipe = load_recipe(args.recipe, overrides)
    rank, world = rank_and_world(args.rank, args.world_size)
    configure(recipe.num_threads or None)
    summary = curate(recipe, rank=rank, world_size=world, progress=not args.no_progress)
    if summary is not None:
        out = summary["output"]
        print(f"curated {summary['input_rows']} rows into {out['rows']} ({out['synthetic']} synthetic) in "
              f"{summary['seconds']:.1f} s; wrote " + ", ".join(out["files"].values()) + f", {summary['report']['report']}")
    return 0
