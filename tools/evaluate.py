"""Score predictions against references: python tools/evaluate.py RESULTS.txt REFS.tsv [--mode jieba|char] [--json OUT] [--fields]"""
import sys

from paddle_caption.eval.evaluate import main
from paddle_caption.runtime import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
