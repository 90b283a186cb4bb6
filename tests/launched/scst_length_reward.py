"""Run under `paddle.distributed.launch` by tests/test_scst.py: trains the config given with SCST's
reward replaced by the sampled caption's length in characters (a random micro model's captions all
score CIDEr-D 0, which would leave nothing to compare), through the entry point
`supervised_finetune.py` calls."""
from __future__ import annotations

import sys

import numpy as np


def length_reward(self, captions, ids):
    return np.array([float(len(c)) for c in captions])


def main(configs: list[str]) -> int:
    from paddle_caption.train.scst import CaptionReward

    from train_configs import main as train_configs  # tests/launched/ is the script's directory

    CaptionReward.__call__ = length_reward
    return train_configs(configs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
