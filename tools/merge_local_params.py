"""Merge trained local parameters or LoRA adapters into a full model directory:
python tools/merge_local_params.py --model_name_or_path BASE --local_path|--lora_path CKPT --merge_model_path OUT"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("merge"))
