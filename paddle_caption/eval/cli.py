"""The scoring command's command line: `evaluate` (tools/evaluate.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..files import write_json
from . import evaluate
from .caption_scores import MODES
from .evaluate import default_json_path, evaluate_files, format_table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate", description=evaluate.__doc__.split("\n\n")[0])
    parser.add_argument("results", help="predictions: 'id<TAB>caption' per line")
    parser.add_argument("refs", help="references: 'id<TAB>caption' (id may repeat) or contest rows")
    parser.add_argument("--mode", choices=MODES, default="jieba",
                        help="tokenisation: jieba words (contest) or single characters")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the scores (default: RESULTS.scores.json beside RESULTS)")
    parser.add_argument("--fields", action="store_true",
                        help="also report field accuracy (synthetic ad captions only)")
    return parser.parse_args(argv)


def evaluate_main(argv=None) -> int:
    args = parse_args(argv)
    scores = evaluate_files(args.results, args.refs, mode=args.mode, fields=args.fields)
    out = args.json or default_json_path(args.results)
    record = {**scores, "results": str(args.results), "refs": str(args.refs)}
    write_json(out, record)
    print(format_table(scores))
    print(f"scores written to {out}")
    return 0
