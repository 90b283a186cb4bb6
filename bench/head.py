"""Benchmark the inference output layer (`model/head.py: project`) by row count, plain vs frozen.

    python bench/head.py [--threads 1] [--rows 1,2,4,8,16,32,64,144] [--repeats 20] [--out bench/results/head.json]

The tiny model's real-vocabulary head: [rows, 64] x [64, 151936] float32, under `paddle.no_grad()`
as in generation. "plain" is the numpy product `project` always used; "frozen" is `project` inside
`transposed_head` (decoding/output_head.py: what generation and a `load_predictor` model use): 2-32 rows go through a
transposed copy of the weight, the layout OpenBLAS handles well for few rows. The copy itself is
made once per freeze and timed separately. Times are best-of CPU time of this process (a shared
machine moves wall time much more), per call.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from common import RESULTS_DIR, command_line, machine_info, write_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,144")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS_DIR / "head.json"))
    args = parser.parse_args()
    from paddle_caption.runtime import configure

    paddle = configure(args.threads)
    from paddle_caption.decoding.output_head import FEW_ROWS, transposed_head
    from paddle_caption.model.head import project

    paddle.seed(0)
    head = paddle.nn.Linear(64, 151936, bias_attr=False)

    def best_cpu(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            start = time.process_time()
            fn()
            best = min(best, time.process_time() - start)
        return best

    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    with paddle.no_grad():
        start = time.process_time()
        with transposed_head(head):
            project(paddle.randn([2, 64]), head)  # the first few-rows call makes the copy
        copy_ms = 1e3 * (time.process_time() - start)
        for rows in rows_list:
            hidden = paddle.randn([rows, 64])
            plain = best_cpu(lambda: project(hidden, head))
            with transposed_head(head):
                project(hidden, head)
                frozen = best_cpu(lambda: project(hidden, head))
            results.append({"rows": rows, "plain_ms": round(1e3 * plain, 3), "frozen_ms": round(1e3 * frozen, 3),
                            "speedup": round(plain / frozen, 2)})
    report = {"command": command_line(), "machine": machine_info(paddle=paddle.__version__, threads=args.threads,
                                                                  omp=os.environ.get("OMP_NUM_THREADS")),
              "few_rows": list(FEW_ROWS), "transposed_copy_ms": round(copy_ms, 1), "results": results}
    write_report(args.out, report)
    print(f"output layer [rows, 64] x [64, 151936], {args.threads} thread(s), best of {args.repeats} "
          f"(CPU ms); the transposed copy: {copy_ms:.1f} ms once per freeze\n")
    print("| rows | plain ms | frozen ms | speed-up |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['plain_ms']:.2f} | {r['frozen_ms']:.2f} | {r['speedup']:.2f}× |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
