"""Train for the metric (make scst-demo): python tools/run_scst_demo.py --demo checkpoints/demo --minutes 5"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("scst-demo"))
