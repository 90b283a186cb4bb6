"""The one-command demo (make demo): python tools/run_demo.py --config config/demo.json --out checkpoints/demo"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("demo"))
