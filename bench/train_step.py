"""Training-step throughput of the tiny model: supervised-positions-only loss vs full-vocabulary logits.

    python bench/train_step.py [--batch-sizes 1,4,8] [--steps 4] [--threads N] [--out bench/results/train_step.json]

Real samples: synthetic ad images converted by the data pipeline, the style-aware prompt, the
256-token image span and the real 151,936-token vocabulary (config/model/tiny.json, every
parameter trainable). A step is forward + backward + AdamW. For each loss mode a fresh process
runs batch sizes in ascending order (so its peak RSS at B is the peak over B' <= B), times the
median of `--steps` steps after one warm-up step, and checks the two modes' losses agree.

- `supervised` (the default in training): the last decoder layer and lm_head only at positions
  whose label is not -100, the head fused with cross-entropy (numpy BLAS on CPU, model/head.py);
- `all`: lm_head over every position, then cross-entropy on the supervised ones (what a plain
  causal-LM loss does).
Target: >= 3x samples/s from `supervised`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, RESULTS_DIR, command_line, machine_info, peak_rss_mb, write_report

TARGET = 3.0


def worker(args) -> dict:
    from paddle_caption.runtime import configure

    paddle = configure(args.threads)
    from paddle_caption.data.convert import RunOptions, convert
    from paddle_caption.data.dataset import CaptionDataset, collate_batch
    from paddle_caption.data.records import load_records
    from paddle_caption.data.prompts import PromptTemplate
    from paddle_caption.data.synthetic import write_dataset
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.tokenizer import QWenVLTokenizer

    config = MgenVLConfig.from_pretrained(ROOT / "config/model/tiny.json")
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp) / "tsv", 48, 0, 0, seed=1, workers=1, progress=False)
        convert(Path(tmp) / "tsv" / "train.tsv", Path(tmp) / "conv", opts=RunOptions(workers=1, progress=False))
        records = load_records(Path(tmp) / "conv" / "records.jsonl")
        tokenizer = QWenVLTokenizer.for_model(config)
        data = CaptionDataset(records, tokenizer, PromptTemplate.from_files(), config.visual.image_size, 512)
        items = [data[i] for i in range(len(data))]
    results = []
    for batch_size in args.batch_sizes:
        paddle.seed(0)
        model = MgenVLForCausalLM(config)
        model.train()
        opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())
        times, losses, tokens, supervised = [], [], 0, 0
        for step in range(args.steps + 1):
            batch = collate_batch(items[step * batch_size:(step + 1) * batch_size], data.pad_id)
            start = time.perf_counter()
            out = model(input_ids=paddle.to_tensor(batch["input_ids"]), images=paddle.to_tensor(batch["images"]),
                        attention_mask=paddle.to_tensor(batch["attention_mask"]),
                        labels=paddle.to_tensor(batch["labels"]), loss_on=args.mode)
            out.loss.backward()
            opt.step()
            opt.clear_grad()
            elapsed = time.perf_counter() - start
            if step == 0:
                continue  # warm-up: allocator and kernel selection
            times.append(elapsed)
            losses.append(float(out.loss))
            tokens += int(batch["attention_mask"].sum())
            supervised += int((batch["labels"] != -100).sum())
        seconds = statistics.median(times)
        results.append({"batch_size": batch_size, "seconds_per_step": round(seconds, 4),
                        "samples_per_s": round(batch_size / seconds, 3),
                        "tokens_per_sample": round(tokens / (args.steps * batch_size), 1),
                        "supervised_per_sample": round(supervised / (args.steps * batch_size), 1),
                        "losses": [round(x, 5) for x in losses], "peak_rss_mb": round(peak_rss_mb(), 1)})
    return {"mode": args.mode, "threads": args.threads, "paddle": paddle.__version__, "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per batch size (median)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "train_step.json")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.mode:
        print(json.dumps(worker(args)))
        return 0

    runs = {}
    for mode in ("supervised", "all"):
        cmd = [sys.executable, __file__, "--mode", mode, "--batch-sizes", ",".join(map(str, args.batch_sizes)),
               "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
        print(f"{mode}: done", flush=True)
    rows = []
    for sup, full in zip(runs["supervised"]["results"], runs["all"]["results"]):
        same = all(abs(a - b) < 1e-3 * max(1.0, abs(b)) for a, b in zip(sup["losses"], full["losses"][:1]))
        rows.append({"batch_size": sup["batch_size"], "supervised": sup, "all": full,
                     "speedup": round(sup["samples_per_s"] / full["samples_per_s"], 2),
                     "first_step_loss_equal": same})
    report = {"command": command_line(), "machine": machine_info(paddle=runs["all"]["paddle"], threads=args.threads),
              "model": "config/model/tiny.json (real vocabulary, 256-token image span, full prompt)",
              "target_speedup": TARGET, "rows": rows}
    write_report(args.out, report)
    print("\n| batch | supervised-only: samples/s | peak RSS (MB) | full logits: samples/s | peak RSS (MB) | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s, a = r["supervised"], r["all"]
        print(f"| {r['batch_size']} | {s['samples_per_s']:.2f} | {s['peak_rss_mb']:.0f} | {a['samples_per_s']:.2f} "
              f"| {a['peak_rss_mb']:.0f} | {r['speedup']:.1f}x |")
    print(f"\ntokens/sample {rows[0]['supervised']['tokens_per_sample']}, supervised positions/sample "
          f"{rows[0]['supervised']['supervised_per_sample']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
