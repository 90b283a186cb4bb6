"""Score predictions against references: python tools/evaluate.py RESULTS.txt REFS.tsv [--mode jieba|char] [--json OUT] [--fields]"""

import sys

from paddle_caption.entry_points import run

if __name__ == "__main__":
    sys.exit(run("evaluate"))
