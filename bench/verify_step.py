"""Benchmark a decode step by rows and width, with the full output layer vs the greedy head.

    python bench/verify_step.py --model DIR [--threads 1] [--batch-sizes 1,4,16] [--widths 1,2,3,5,8]
                                [--repeats 20] [--out bench/results/verify_step.json]

`DecodeBatch.step_many` on a trained model (prefilled with synthetic test images, a few greedy
steps taken), feeding every row `width` tokens (width 1: a plain decode step; width w: a verify
step with w - 1 drafted tokens), then reading each fed position's greedy token and rolling back, as
the scheduler does. "full" computes the whole output layer (the batch's greedy head switched off:
what every step paid before `decoding/greedy_head.py`); "greedy" takes the tokens through the
`GreedyHead` (exact; the forward skips the output layer). Both take turns in every repeat; best of
the repeats, wall ms per step. The tokens of both are checked equal.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from common import RESULTS_DIR, command_line, machine_info, write_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a trained model directory (the demo's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--widths", default="1,2,3,5,8")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS_DIR / "verify_step.json"))
    args = parser.parse_args()
    from paddle_caption.runtime import configure

    paddle = configure(args.threads)
    import numpy as np

    from paddle_caption.data.images import b64decode_strict, decode_image
    from paddle_caption.data.synthetic import generate_split
    from paddle_caption.decoding.batch import DecodeBatch
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.predict.predictor import load_predictor

    predictor = load_predictor(args.model, GenerationConfig(max_new_tokens=8))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    rows = list(generate_split("test", max(sizes), seed=0))
    images = [predictor.preprocess(decode_image(b64decode_strict(r.image_b64))) for r in rows]
    prompt = list(predictor.prompt_ids)

    def prepared(size: int, greedy: bool):
        batch = DecodeBatch(predictor.model, predictor.tokenizer.pad_id)
        if not greedy:
            batch.head = None  # the forward returns full logits, as before the greedy head
        batch.add([prompt] * size, predictor.pixels(images[:size]))
        for _ in range(3):  # into the caption, where verification happens
            batch.step(batch.greedy())
        return batch

    results = []
    with paddle.no_grad():
        for size in sizes:
            batches = {"full": prepared(size, False), "greedy": prepared(size, True)}
            for width in widths:
                best = {name: float("inf") for name in batches}
                tokens = {}
                for _ in range(args.repeats):
                    for name, batch in batches.items():
                        fed = np.tile(batch.greedy()[:, None], (1, width))
                        start = time.perf_counter()
                        out = batch.step_many(fed, np.full(size, width))
                        tokens[name] = out.greedy()
                        batch.rollback(np.ones(size, dtype=np.int64))
                        best[name] = min(best[name], time.perf_counter() - start)
                results.append({"batch": size, "width": width, "full_ms": round(1e3 * best["full"], 2),
                                "greedy_ms": round(1e3 * best["greedy"], 2),
                                "speedup": round(best["full"] / best["greedy"], 2),
                                "tokens_equal": bool(np.array_equal(tokens["full"], tokens["greedy"]))})
    head = batches["greedy"].head
    report = {"command": command_line(), "model": str(args.model),
              "machine": machine_info(paddle=paddle.__version__, threads=args.threads,
                                      omp=os.environ.get("OMP_NUM_THREADS"),
                                      load_average=list(os.getloadavg())),
              "greedy_head": head.summary() if head is not None else None, "results": results}
    write_report(args.out, report)
    print(f"decode step (DecodeBatch.step_many + greedy tokens + rollback), {args.threads} thread(s), "
          f"best of {args.repeats}, wall ms; greedy head: {report['greedy_head']}\n")
    print("| batch | width (tokens fed per row) | full output layer ms | greedy head ms | speed-up | tokens equal |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batch']} | {r['width']} | {r['full_ms']:.2f} | {r['greedy_ms']:.2f} | {r['speedup']:.2f}× | "
              f"{'yes' if r['tokens_equal'] else 'NO'} |")
    print(f"\nwrote {args.out}")
    return 0 if all(r["tokens_equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
