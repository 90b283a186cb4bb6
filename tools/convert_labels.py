"""Clean a contest TSV into records.jsonl: python tools/convert_labels.py INPUT.tsv OUT_DIR [options]"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("convert"))
