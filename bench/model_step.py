"""One training step of our LLM against paddlenlp's `QWenModel` + `lm_head`, same shape, same weights.

    python bench/model_step.py [--layers 8,32] [--steps 3] [--threads N] [--out bench/results/model_step.json]

Shape (the issue's): hidden 64, 4 heads, batch 4, 450 tokens, loss on the last 40 positions, the
real 151,936-token vocabulary, text only (the visual tower is not part of paddlenlp's QWen). Both
models get the same weights (ours copied into paddlenlp's by name: `transformer.llm.X` -> `X`)
and the same batch, so their losses must be equal; a step is forward + backward + AdamW over all
parameters. paddlenlp's step is what its `QWenForCausalLM` does: logits at every position, then
cross-entropy with ignore_index -100. Ours is the training default: the last layer and lm_head only
at supervised positions, the head fused with cross-entropy in numpy BLAS on CPU.
Target: ours >= 1.5x faster per sample at equal loss.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, RESULTS_DIR, command_line, machine_info, peak_rss_mb, write_report

TARGET = 1.5
BATCH, TOKENS, SUPERVISED = 4, 450, 40


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="8,32")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median), after one warm-up")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "model_step.json")
    args = parser.parse_args()

    from paddle_caption.runtime import configure

    configure(args.threads)
    import paddle
    import numpy as np
    from paddlenlp.transformers import QWenConfig, QWenModel
    from paddlenlp.utils.log import logger

    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    logger.set_level("WARNING")
    base = json.loads((ROOT / "config/model/tiny.json").read_text())
    rng = np.random.default_rng(0)
    ids = paddle.to_tensor(rng.integers(0, 151643, size=(BATCH, TOKENS)), dtype="int64")
    labels_np = np.full((BATCH, TOKENS), -100, dtype=np.int64)
    labels_np[:, -SUPERVISED:] = rng.integers(0, 151643, size=(BATCH, SUPERVISED))
    labels = paddle.to_tensor(labels_np)
    shift = paddle.to_tensor(labels_np[:, 1:].reshape(-1))
    n_supervised = int((labels_np[:, 1:] != -100).sum())

    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        cfg = MgenVLConfig.from_dict({**base, "num_hidden_layers": layers, "num_attention_heads": 4,
                                      "kv_channels": 16})
        paddle.seed(0)
        ours = MgenVLForCausalLM(cfg)
        # the visual tower is not part of the comparison: freeze it so neither side pays AdamW for it
        for name, p in ours.named_parameters():
            p.stop_gradient = name.startswith("visual.")
        theirs_cfg = QWenConfig(vocab_size=cfg.vocab_size, hidden_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, kv_channels=16, intermediate_size=cfg.intermediate_size,
                                rotary_emb_base=cfg.rotary_emb_base, layer_norm_epsilon=cfg.layer_norm_epsilon,
                                seq_length=cfg.seq_length, use_dynamic_ntk=cfg.use_dynamic_ntk,
                                use_logn_attn=cfg.use_logn_attn, max_position_embeddings=cfg.max_position_embeddings)
        theirs = QWenModel(theirs_cfg)
        head = paddle.nn.Linear(64, cfg.vocab_size, bias_attr=False)
        own = {k.removeprefix("transformer.llm."): v for k, v in ours.state_dict().items()
               if k.startswith("transformer.llm.")}
        theirs.set_state_dict(own)
        head.weight.set_value(ours.lm_head.weight)
        missing = set(theirs.state_dict()) - set(own)
        assert not missing, f"paddlenlp parameters without a counterpart: {sorted(missing)[:3]}"

        def our_step(opt):
            loss = ours(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.clear_grad()
            return float(loss)

        def their_step(opt):
            hidden = theirs(input_ids=ids)[0]
            logits = head(hidden)[:, :-1].reshape([-1, cfg.vocab_size])
            # mean over supervised positions, as PaddleNLP's QWen criterion does (masked sum / count)
            per_token = paddle.nn.functional.cross_entropy(logits, shift.unsqueeze(-1), ignore_index=-100,
                                                           reduction="none")
            loss = per_token.sum() / n_supervised
            loss.backward()
            opt.step()
            opt.clear_grad()
            return float(loss)

        result = {"layers": layers}
        for name, step, params in (("ours", our_step, [p for p in ours.parameters() if not p.stop_gradient]),
                                   ("paddlenlp", their_step, list(theirs.parameters()) + [head.weight])):
            opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=params)
            losses, times = [], []
            for i in range(args.steps + 1):
                start = time.perf_counter()
                losses.append(step(opt))
                if i:
                    times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            result[name] = {"seconds_per_step": round(seconds, 4), "seconds_per_sample": round(seconds / BATCH, 4),
                            "losses": [round(x, 5) for x in losses], "peak_rss_mb": round(peak_rss_mb(), 1)}
            print(f"{layers} layers, {name}: {seconds / BATCH:.3f} s/sample, losses {result[name]['losses']}",
                  flush=True)
        result["speedup"] = round(result["paddlenlp"]["seconds_per_step"] / result["ours"]["seconds_per_step"], 2)
        result["loss_equal"] = bool(np.allclose(result["ours"]["losses"], result["paddlenlp"]["losses"],
                                                rtol=1e-4, atol=1e-4))
        rows.append(result)

    report = {"command": command_line(), "machine": machine_info(paddle=paddle.__version__, threads=args.threads),
              "shape": {"hidden": 64, "heads": 4, "batch": BATCH, "tokens": TOKENS, "supervised": SUPERVISED,
                        "vocab": 151936}, "target_speedup": TARGET, "rows": rows}
    write_report(args.out, report)
    print("\n| layers | ours s/sample | paddlenlp s/sample | speed-up | losses equal (every step) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['ours']['seconds_per_sample']:.3f} | {r['paddlenlp']['seconds_per_sample']:.3f} "
              f"| {r['speedup']:.2f}x | {'yes' if r['loss_equal'] else 'NO'} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
