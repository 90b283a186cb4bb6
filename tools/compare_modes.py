"""Fine-tune modes compared (make compare-modes): python tools/compare_modes.py --minutes 10"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("compare-modes"))
