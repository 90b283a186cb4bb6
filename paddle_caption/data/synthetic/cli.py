"""`make-data` (tools/make_demo_data.py OUT_DIR --train N --val M --test K --seed S [noise])."""
from __future__ import annotations

import argparse

from .rows import NoiseConfig
from .writer import write_dataset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic ad-image captioning dataset (train/val/test TSV in the contest format).")
    parser.add_argument("out_dir", help="directory for train.tsv, val.tsv, test.tsv, test_refs.tsv")
    parser.add_argument("--train", type=int, default=2000, help="training rows, ~8%% of them dirty (default 2000)")
    parser.add_argument("--val", type=int, default=200, help="validation rows (default 200)")
    parser.add_argument("--test", type=int, default=200, help="test rows (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes to render with (default: the core count); output does not depend on it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    noise = parser.add_argument_group("noise for data curation (docs/synthetic_ads.md; off by default)")
    noise.add_argument("--mismatched", type=float, default=0.0, help="share of training rows with another image's caption")
    noise.add_argument("--wrong-word", type=float, default=0.0, help="share with a wrong style or colour word")
    noise.add_argument("--truncated", type=float, default=0.0, help="share with a truncated caption")
    noise.add_argument("--near-duplicates", type=float, default=0.0,
                       help="share whose image is a near-identical copy of an earlier row's")
    noise.add_argument("--unlabeled", type=int, default=0, help="images in an unlabeled pool (unlabeled.tsv)")
    args = parser.parse_args(argv)
    cfg = NoiseConfig(args.mismatched, args.wrong_word, args.truncated, args.near_duplicates, args.unlabeled)
    summary = write_dataset(args.out_dir, args.train, args.val, args.test, args.seed,
                            workers=args.workers, progress=not args.quiet,
                            noise=cfg if cfg.any or cfg.unlabeled else None)
    files, counts = summary["files"], summary["counts"]
    dirty = ", ".join(f"{kind}={n}" for kind, n in summary["dirty"].items())
    print(f"wrote {files['train']}: {counts['train']} rows ({summary['train_clean']} clean, "
          f"{summary['train_dirty']} dirty: {dirty})")
    print(f"wrote {files['val']}: {counts['val']} rows")
    print(f"wrote {files['test']}: {counts['test']} rows (id, base64) and {files['test_refs']} (id, caption)")
    if "noise" in summary:
        noisy = ", ".join(f"{kind}={n}" for kind, n in summary["noise"].items())
        print(f"wrote {files['train_noise']}: the noisy training rows ({noisy}); not training data")
        if summary["counts"]["unlabeled"]:
            print(f"wrote {files['unlabeled']}: {summary['counts']['unlabeled']} unlabeled images "
                  f"(references in {files['unlabeled_refs']})")
    print(f"seed {summary['seed']}, {summary['workers']} worker(s), {summary['seconds']:.1f} s")
    return 0
