"""Write a synthetic ad-image dataset: python tools/make_demo_data.py OUT_DIR --train N --val M --test K --seed S"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("make-data"))
