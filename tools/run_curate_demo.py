"""The curation demo (make curate-demo): python tools/run_curate_demo.py --out checkpoints/curate_demo"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("curate-demo"))
