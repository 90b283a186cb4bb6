"""Convert a Hugging Face Qwen-VL (safetensors or pytorch_model-*.bin) or PaddleMIX (model_state.pdparams)
checkpoint into a sharded safetensors model directory, reading pickles as arrays only:
python tools/convert_checkpoint.py SRC DST [--dtype bfloat16] [--allow_pickle]"""
import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("convert-checkpoint"))
