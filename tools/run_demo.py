"""The one-command demo (make demo): python tools/run_demo.py --config config/demo.json --out checkpoints/demo"""
import sys

from paddle_caption.demo.pipeline import main
from paddle_caption.runtime import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
