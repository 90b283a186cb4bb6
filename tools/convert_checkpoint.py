"""Convert a PaddleMIX (model_state.pdparams, with --allow_pickle) or Hugging Face Qwen-VL checkpoint
into a sharded safetensors model directory:
python tools/convert_checkpoint.py SRC DST [--dtype bfloat16] [--allow_pickle]"""
import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("convert-checkpoint"))
