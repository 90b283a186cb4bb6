#!/usr/bin/env python
"""Fine-tune Mgen-VL / Qwen-VL on converted caption records: see paddle_caption/train/."""
import sys

from paddle_caption.runtime import run_cli
from paddle_caption.train.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
