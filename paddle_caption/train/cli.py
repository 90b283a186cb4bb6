"""`python supervised_finetune.py CONFIG.json [--key value ...] [--resume]`.

The config is parsed and checked (unknown keys, wrong types) before paddle is imported, so a typo
costs a second, not a model load. A run auto-resumes from the newest complete checkpoint in its
output_dir; `--resume` additionally insists that there is one.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..runtime import UserError

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
    from .checkpoints import latest_checkpoint

    if require_resume and latest_checkpoint(Path(cfg.output_dir)) is None:
        raise UserError(f"--resume: no complete checkpoint in {cfg.output_dir}")
    from .trainer import Trainer

    Trainer(cfg).train()
    return 0
