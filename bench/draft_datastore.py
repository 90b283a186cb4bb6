"""Benchmark the retrieval-drafting datastore at scale: build, size, load and lookup times.

    python bench/draft_datastore.py [--captions 1000000] [--lookups 2000] [--out bench/results/draft_datastore.json]

Captions come from the synthetic ad world's caption generator (no images are drawn), tokenised
with the real Qwen vocabulary, each followed by `<|im_end|>` as in `DraftDatastore.from_captions`.
Timed: tokenising, building the suffix array, saving, loading (`DraftDatastore.load`: memory-mapped,
so it reads the metadata only; the first lookups then page in what they touch) and drafting for
rows part-way through a caption (`RetrievalDrafter.draft` with the default settings, a fresh row
each time, so every call does the full search from the caption start). Target: loads in well under
a second for 1M captions (issue 17).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, command_line, machine_info, peak_rss_mb, write_report  # noqa: E402

RESULTS = RESULTS_DIR / "draft_datastore.json"


class _Row:
    def __init__(self, tokens):
        self.tokens, self.draft_state = tokens, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import numpy as np

    from paddle_caption.data.synthetic import format_caption, sample_fields
    from paddle_caption.decoding.datastore import DraftDatastore
    from paddle_caption.decoding.drafting import RetrievalDrafter
    from paddle_caption.tokenizer import QWenVLTokenizer

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    captions = [format_caption(sample_fields(rng)) for _ in range(args.captions)]
    generate_s = time.perf_counter() - start
    tokenizer = QWenVLTokenizer.from_pretrained()
    start = time.perf_counter()
    sequences = [ids + [tokenizer.im_end_id] for ids in tokenizer.encode_batch(captions)]
    tokenize_s = time.perf_counter() - start
    store = DraftDatastore.build(sequences, source="synthetic captions")
    build_s = store.info["build_seconds"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store.save(Path(tmp) / "ds")
        save_s = time.perf_counter() - start
        disk = sum(f.stat().st_size for f in (Path(tmp) / "ds").iterdir())
        start = time.perf_counter()
        loaded = DraftDatastore.load(Path(tmp) / "ds")
        load_s = time.perf_counter() - start
        drafter = RetrievalDrafter(loaded, stop_ids=tokenizer.stop_ids)
        picks = rng.integers(0, len(sequences), args.lookups)
        rows = [_Row(sequences[i][:int(rng.integers(0, len(sequences[i])))]) for i in picks]
        start = time.perf_counter()
        first = drafter.draft(rows[0], drafter.num_draft_tokens)
        first_ms = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        drafted = sum(len(drafter.draft(row, drafter.num_draft_tokens)) for row in rows)
        lookup_ms = 1e3 * (time.perf_counter() - start) / len(rows)
    report = {
        "command": command_line(), "machine": machine_info(),
        "captions": args.captions, "tokens": store.info["tokens"], "depth": store.depth,
        "generate_captions_s": round(generate_s, 2), "tokenize_s": round(tokenize_s, 2),
        "build_s": round(build_s, 2), "save_s": round(save_s, 2), "disk_mb": round(disk / 2 ** 20, 1),
        "load_s": round(load_s, 4), "first_draft_ms": round(first_ms, 2), "first_draft": first.tolist(),
        "draft_ms": round(lookup_ms, 3), "drafted_tokens_per_lookup": round(drafted / len(rows), 2),
        "peak_rss_mb": round(peak_rss_mb(), 0), "target": {"load_s_below": 1.0},
    }
    write_report(args.out, report)
    print(f"{args.captions:,} captions, {store.info['tokens']:,} tokens: tokenise {tokenize_s:.1f} s, "
          f"build {build_s:.1f} s, save {save_s:.1f} s ({report['disk_mb']} MB), load {1e3 * load_s:.1f} ms, "
          f"first draft {first_ms:.1f} ms, then {lookup_ms:.3f} ms per draft "
          f"({report['drafted_tokens_per_lookup']} tokens), peak RSS {report['peak_rss_mb']:.0f} MB")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
