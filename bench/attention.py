"""The attention core on CPU: the numpy op (model/attention.py) against the plain Paddle expression.

    python bench/attention.py [--threads 1] [--repeats 5] [--out bench/results/attention.json]

Shapes are the tiny model's real ones: the decoder's prefill at batch 16 (390 tokens, causal +
padding mask), a training step's decoder at batch 8 (410 tokens, forward + backward) and the
336 px ViT at batch 16 (576 patches, 4 heads, no mask). Each cell is the best of `--repeats`
runs; outputs (and gradients) are checked equal between the two paths.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from common import RESULTS_DIR, best_of, command_line, machine_info, write_report

SHAPES = [  # name, batch, heads, queries, keys, head_dim, mask, backward
    ("decoder prefill", 16, 2, 390, 390, 32, True, False),
    ("decoder train step", 8, 2, 410, 410, 32, True, True),
    ("ViT 336 px", 16, 4, 576, 576, 16, False, False),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS_DIR / "attention.json"))
    args = parser.parse_args()

    from paddle_caption.runtime import configure

    paddle = configure(args.threads)
    from paddle_caption.model import attention as core
    from paddle_caption.model.qwen import MASK_VALUE

    rng = np.random.default_rng(0)
    rows = []
    for name, b, h, nq, nk, d, masked, backward in SHAPES:
        q, k, v = (paddle.to_tensor(rng.standard_normal((b, h, n, d)).astype(np.float32), stop_gradient=not backward)
                   for n in (nq, nk, nk))
        bias = None
        if masked:
            allowed = np.tril(np.ones((nq, nk), dtype=bool))[None].repeat(b, 0)
            allowed[: b // 2, :, :7] = False  # half the rows left-padded by 7 tokens
            allowed |= np.eye(nq, nk, dtype=bool)[None]  # a padded query still sees itself
            bias = paddle.to_tensor(np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None])

        def run(use_numpy):
            core_fn = core.attention if use_numpy else paddle_expression
            if not backward:
                with paddle.no_grad():
                    return core_fn(q, k, v, d ** -0.5, bias).numpy(), None
            out = core_fn(q, k, v, d ** -0.5, bias)
            out.sum().backward()
            grads = [t.grad.numpy().copy() for t in (q, k, v)]
            for t in (q, k, v):
                t.clear_gradient()
            return out.numpy(), grads

        def paddle_expression(q, k, v, scale, bias):
            scores = paddle.matmul(q * scale, k, transpose_y=True)
            if bias is not None:
                scores = scores + bias
            return paddle.matmul(paddle.nn.functional.softmax(scores, axis=-1), v)

        run(True), run(False)  # warm-up
        t_numpy, (out_n, grads_n) = best_of(args.repeats, lambda: run(True))
        t_paddle, (out_p, grads_p) = best_of(args.repeats, lambda: run(False))
        equal = np.allclose(out_n, out_p, rtol=1e-4, atol=1e-5) and (
            grads_n is None or all(np.allclose(a, c, rtol=1e-3, atol=1e-4) for a, c in zip(grads_n, grads_p)))
        rows.append({"shape": name, "batch": b, "heads": h, "queries": nq, "keys": nk, "head_dim": d,
                     "backward": backward, "paddle_ms": round(t_paddle * 1e3, 1),
                     "numpy_ms": round(t_numpy * 1e3, 1), "speedup": round(t_paddle / t_numpy, 2),
                     "equal": bool(equal)})
        print(f"{name}: done", flush=True)
    report = {"command": command_line(), "machine": machine_info(paddle=paddle.__version__, threads=args.threads),
              "rows": rows}
    write_report(args.out, report)
    print("\n| shape | B x H x Q x K x D | pass | Paddle ms | numpy op ms | speed-up | equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']}x{r['heads']}x{r['queries']}x{r['keys']}x{r['head_dim']} | "
              f"{'fwd+bwd' if r['backward'] else 'fwd'} | {r['paddle_ms']} | {r['numpy_ms']} | "
              f"{r['speedup']:.2f}x | {'yes' if r['equal'] else 'NO'} |")
    print(f"\nwrote {args.out}")
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
