"""Dataset statistics and plots: python tools/analyze_data.py INPUT(.tsv|records.jsonl) OUT_DIR"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("analyze"))
