"""Clean a contest TSV into records.jsonl: python tools/convert_labels.py INPUT.tsv OUT_DIR [options]"""
import sys

from paddle_caption.data.convert import main
from paddle_caption.runtime import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
