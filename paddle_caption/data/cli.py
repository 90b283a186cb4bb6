"""The data commands' command lines: `convert` (tools/convert_labels.py) and `analyze`
(tools/analyze_data.py). `make-data` is the synthetic world's own (`synthetic/cli.py`)."""
from __future__ import annotations

import argparse
import dataclasses

from ..runtime import UserError
from .clean_rules import CleanConfig
from .contest_tsv import DEFAULT_MAX_ROW_BYTES
from .analyze import analyze
from .convert import RunOptions, convert
from .images import MAX_COMPRESSION_RATIO, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, VERIFY_MODES
from .reject_reasons import REJECT_REASONS
from .stats import DEFAULT_MAX_NEW_TOKENS, STYLE_PATTERN


# ---- convert ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Clean a contest TSV (id \\t base64 \\t caption) into records.jsonl + rejects.tsv + summary.json.",
        epilog="Cleaning options override --config, which overrides the defaults. Reasons: " + ", ".join(REJECT_REASONS))
    parser.add_argument("input", help="contest TSV, UTF-8, no header")
    parser.add_argument("out_dir", help="output directory")
    s = argparse.SUPPRESS  # cleaning options default to "not given", so that --config can supply them
    rules = parser.add_argument_group("cleaning rules (also settable in --config)")
    rules.add_argument("--config", help="JSON file with CleanConfig keys, e.g. {\"min_side\": 64}")
    rules.add_argument("--style-check", dest="require_style", action=argparse.BooleanOptionalAction, default=s,
                       help="reject captions without a style phrase (default: on)")
    rules.add_argument("--style-pattern", default=s, help=f"regex of the style phrase (default {STYLE_PATTERN})")
    rules.add_argument("--empty-caption-check", dest="drop_empty_caption", action=argparse.BooleanOptionalAction,
                       default=s, help="reject empty captions (default: on)")
    rules.add_argument("--dedup", dest="dedup_ids", action=argparse.BooleanOptionalAction, default=s,
                       help="reject rows repeating a kept id (default: on)")
    rules.add_argument("--verify", choices=VERIFY_MODES, default=s,
                       help="image check: full decode, fast (JPEG at 1/8 scale, same rejects), or header only "
                            "(default: fast)")
    rules.add_argument("--min-side", type=int, default=s, help=f"minimum image side in pixels; 0 disables (default {MIN_IMAGE_SIDE})")
    rules.add_argument("--max-pixels", type=int, default=s,
                       help=f"maximum width*height in the header: more is a decompression bomb (default {MAX_IMAGE_PIXELS})")
    rules.add_argument("--max-compression-ratio", type=float, default=s,
                       help="above 16.7 MP, maximum RGB bytes per payload byte: more is a decompression bomb "
                            f"(default {MAX_COMPRESSION_RATIO:g})")
    rules.add_argument("--max-row-bytes", type=int, default=s,
                       help=f"longer rows are rejected unread (default {DEFAULT_MAX_ROW_BYTES})")
    rules.add_argument("--ksigma", type=float, default=s,
                       help="reject captions whose length is outside mean +- K*std of kept captions (default: off)")
    rules.add_argument("--val-fraction", type=float, default=s,
                       help="route this share of kept rows (by sha1 of id) to val_records.jsonl (default 0)")
    rules.add_argument("--captions", default=s,
                       help="MUGE ECommerce-IC layout: INPUT is IC_*.tsv (image_id, base64) and the captions "
                            "come from this IC_*.jsonl ({image_id, text: [captions]})")
    rules.add_argument("--references-per-image", type=int, default=s,
                       help="MUGE layout: training records per image, one per reference (default 0: all)")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=0, help="processes (default: the core count)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT_DIR")
    run.add_argument("--chunk-mb", type=float, default=8.0, help="input range per task in MB (default 8)")
    run.add_argument("--checkpoint-seconds", type=float, default=10.0,
                     help="how often progress is made durable for --resume (default 10)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def convert_main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = CleanConfig()
    if args.config:
        cfg.update_from_file(args.config)
    for f in dataclasses.fields(cfg):
        if hasattr(args, f.name):
            setattr(cfg, f.name, getattr(args, f.name))
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.chunk_mb <= 0:
        raise UserError(f"--chunk-mb must be > 0, got {args.chunk_mb}")
    opts = RunOptions(workers=args.workers, chunk_bytes=int(args.chunk_mb * (1 << 20)),
                      checkpoint_seconds=args.checkpoint_seconds, resume=args.resume, progress=not args.quiet)
    summary = convert(args.input, args.out_dir, cfg, opts)
    print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    run = summary["run"]
    lines = [
        f"read {summary['rows_read']:,} rows ({summary['input_bytes'] / 1e6:,.1f} MB) in {run['seconds']:.1f} s: "
        f"{run['rows_per_s']:,.0f} rows/s, {run['mb_per_s']:,.1f} MB/s, {run['workers']} worker(s)"
        + (" (resumed; rates cover this session)" if run["resumed"] else ""),
        f"kept {summary['kept']:,}" + (f" (train {summary['kept_train']:,}, val {summary['kept_val']:,})"
                                       if "val_records" in summary["files"] else "")
        + f"; rejected {summary['rejected']:,}" + (":" if summary["rejected"] else ""),
    ]
    lines += [f"  {reason:<24}{n:>10,}" for reason, n in summary["rejected_by_reason"].items()]
    if summary["ksigma"]:
        k = summary["ksigma"]
        lines.append(f"k-sigma: kept caption lengths in [{k['low']}, {k['high']}] characters (K={k['k']})")
    lines.append("wrote " + ", ".join(summary["files"].values()))
    return "\n".join(lines)


# ---- analyze --------------------------------------------------------------------------------------
def analyze_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Caption/image statistics and plots for a contest TSV or a records.jsonl (name ending in .jsonl).")
    parser.add_argument("input", help="contest TSV (id, base64, caption) or records.jsonl from convert_labels")
    parser.add_argument("out_dir", help="directory for the PNG plots, summary.txt and summary.json")
    parser.add_argument("--limit", type=int, default=None, help="analyse only the first N rows")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="generation budget to report coverage for (default %(default)s)")
    parser.add_argument("--no-tokenizer", action="store_true", help="count characters instead of Qwen tokens")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    analyze(args.input, args.out_dir, limit=args.limit, max_new_tokens=args.max_new_tokens,
            tokenizer=None if args.no_tokenizer else "auto", progress=not args.quiet)
    return 0
