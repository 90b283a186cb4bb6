"""Export a model directory for Paddle Inference (CPU, oneDNN):
python tools/export_model.py MODEL_DIR OUT_DIR [--precision float32|bfloat16|int8] [--calibration TEST.tsv]"""
import sys

from paddle_caption.deploy.cli import main
from paddle_caption.runtime import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
