"""Export a model directory for Paddle Inference (CPU, oneDNN; see docs/deployment.md):
python tools/export_model.py MODEL_DIR OUT_DIR [--precision float32|bfloat16]"""
import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("export"))
