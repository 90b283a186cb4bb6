#!/usr/bin/env python
"""Fine-tune Mgen-VL / Qwen-VL on converted caption records: see paddle_caption/train/."""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("train"))
