"""Run under `paddle.distributed.launch` by tests/test_recipes_launched.py: trains each config given,
one after another in the same launched job, through the entry point `supervised_finetune.py` calls
(`paddle_caption.train.cli.main`). One launch for several configs saves the launcher's and the
processes' start-up per config; the process group is created once (Paddle reuses it)."""
from __future__ import annotations

import sys


def main(configs: list[str]) -> int:
    from paddle_caption.train.cli import main as train_main

    for config in configs:
        code = train_main([config])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
