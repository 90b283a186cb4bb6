"""Dataset statistics and plots: python tools/analyze_data.py INPUT(.tsv|records.jsonl) OUT_DIR"""
import sys

from paddle_caption.data.analyze import main
from paddle_caption.runtime import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
