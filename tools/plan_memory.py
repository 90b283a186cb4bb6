"""GPU memory a training config needs, per GPU, for data parallel and optimizer-state sharding:
python tools/plan_memory.py CONFIG [CONFIG ...] [--gpus N] [--gpu_memory GiB] [--sharding stage1] [--key value ...]"""
import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("plan-memory"))
