"""Run by `paddle.distributed.launch` for the gpu-check's training item: one training config, through
the entry point `supervised_finetune.py` calls. A file path (the launcher runs scripts, not modules)."""
import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("train"))
