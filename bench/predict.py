"""Benchmark batched captioning against one-by-one ("chat"-style) generation on the tiny model.

    python bench/predict.py [--threads 1,2] [--batch-sizes 1,4,16,32] [--images 32] [--max-new-tokens 32]
        [--repeats 2] [--out bench/results/predict.json]
    python bench/predict.py --model checkpoints/demo/image/model --speculative retrieval \
        [--draft-source FILE_OR_DIR] [--num-draft-tokens 16] --batch-sizes 16 --max-new-tokens 128

By default the model is config/model/tiny.json with random weights (paddle.seed(0)): the real
151936-token vocabulary and LM head, 336 px images, the 256-token image span and the full
style-aware prompt (~390 prompt tokens). Random weights never emit a stop token, so every image
generates exactly `--max-new-tokens` tokens; a trained model stops earlier, and its finished rows
leave the batch. `--model DIR` benchmarks a trained model directory instead (loaded as
predict_batch.py loads it), and `--speculative retrieval` adds speculative rows (drafting from
DIR/draft_datastore or `--draft-source`): one-by-one and at each batch size, with their speed-up
over plain greedy at the same batch size, over plain greedy with the prefill (the
`max_new_tokens=1` run) taken out of both ("decode"), by this process's CPU time (steadier than
wall time on a shared machine, for one-thread runs), and the drafting statistics. Random weights
accept no draft, so speculative rows need a trained model.

For each thread count, in a fresh process (OMP_NUM_THREADS is read when paddle is imported):
- one-by-one: per image, decode + preprocess it and generate with a batch of one (what a loop over
  Qwen-VL's `chat()` does, minus the string templating);
- batched: the same images through `Predictor.caption_batch` in batches of B (images decoded and
  preprocessed per batch, encoded once per batch in the prefill);
- prefill only (max_new_tokens=1) at each B, to show what the image + prompt prefix costs;
- the file path: `predict_tsv` over a TSV of the same images at batch 16 (partial file, merge).
Every timing is the best of `--repeats` runs (other processes share the 2 cores). All token ids
must equal the one-by-one ids. Prints a markdown table and writes bench/results/predict.json.
The model's output layer is frozen as `load_predictor` freezes it (`model/head.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, best_of, best_of_with_cpu, cpu_model  # noqa: E402  (bench/ is on sys.path as a script)

from paddle_caption.decoding.drafting import DEFAULT_DRAFT_TOKENS, SPECULATIVE_MODES  # noqa: E402 (no paddle import)

RESULTS = ROOT / "bench" / "results" / "predict.json"
TINY = ROOT / "config" / "model" / "tiny.json"
TARGET_SPEEDUP_AT_16 = 8.0
TARGET_SPECULATIVE = {1: 2.0, 16: 1.5}  # speculative over plain greedy at the same batch size (issue 17)


class DraftProbe:
    """Wraps a drafter: times its `propose` (the heads' own forward, the datastore lookups) and keeps
    every draft with the position it was made at, so `missed` can name the tokens drafts got wrong."""

    def __init__(self, drafter):
        self.drafter = drafter
        self.name, self.num_draft_tokens = drafter.name, drafter.num_draft_tokens
        self.needs_hidden = getattr(drafter, "needs_hidden", False)
        self.budget = getattr(drafter, "budget", None)
        self.reset()

    def reset(self) -> "DraftProbe":
        self.seconds, self.drafts = 0.0, []
        return self

    def propose(self, rows, limits, hidden=None):
        start = time.perf_counter()
        out = (self.drafter.propose(rows, limits, hidden) if self.needs_hidden
               else self.drafter.propose(rows, limits))
        self.seconds += time.perf_counter() - start
        for row, draft in zip(rows, out):
            tokens = getattr(draft, "tokens", draft)
            self.drafts.append((row, len(row.tokens), [int(t) for t in tokens]))
        return out

    def budget_summary(self):
        return None if self.budget is None else self.budget.summary()

    def missed(self, ids, tokenizer, top: int = 12) -> dict:
        """Among the last timed run's drafts: where the first wrong token was, the true token there
        (decoded), counted; plus how many drafts were empty."""
        from collections import Counter

        wrong, empty, total = Counter(), 0, 0
        for row, at, draft in self.drafts:
            final = row.tokens
            total += 1
            if not draft:
                if at < len(final):
                    wrong["(no draft) " + tokenizer.decode([final[at]])] += 1
                empty += 1
                continue
            for j, token in enumerate(draft):
                if at + j >= len(final):
                    break  # beyond the caption's end: the stop id (not kept in row.tokens)
                if final[at + j] != token:
                    wrong[tokenizer.decode([final[at + j]])] += 1
                    break
        return {"drafts": total, "empty": empty, "first_wrong": wrong.most_common(top)}


def worker(args) -> dict:
    """Runs in a child process whose OMP_NUM_THREADS is already set."""
    import paddle
    from paddle_caption.data.images import b64decode_strict, decode_image
    from paddle_caption.data.prompts import PromptTemplate
    from paddle_caption.data.synthetic import generate_split
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.drafting import load_drafter
    from paddle_caption.decoding.output_head import keep_transposed_head
    from paddle_caption.decoding.scheduler import SpeculationStats
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.predict.predictor import Predictor, load_predictor
    from paddle_caption.predict.run import PredictOptions, predict_tsv
    from paddle_caption.tokenizer import QWenVLTokenizer

    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    if args.model:
        predictor = load_predictor(args.model, gen)
    else:
        paddle.seed(0)
        model = MgenVLForCausalLM(MgenVLConfig.from_pretrained(TINY))
        model.eval()
        keep_transposed_head(model.lm_head)  # as load_predictor does: this model only predicts
        predictor = Predictor(model, QWenVLTokenizer.for_model(model.config), PromptTemplate.from_files(), gen)
    modes = [m for m in args.speculative.split(",") if m != "none"]
    drafters = {mode: DraftProbe(load_drafter(mode, args.model, predictor.tokenizer, args.draft_source,
                                              args.num_draft_tokens, model=predictor.model)) for mode in modes}
    rows = list(generate_split("test", args.images, seed=0))  # synthetic ad images, 320-640 px JPEG
    payloads = [row.image_b64 for row in rows]

    def images_of(chunk):
        return [predictor.preprocess(decode_image(b64decode_strict(p))) for p in chunk]

    def run(batch_size: int, config=None, speculative=None):
        ids, predictor.drafter = [], drafters[speculative].reset() if speculative else None
        stats = SpeculationStats()
        for i in range(0, len(payloads), batch_size):
            ids += predictor.generate_ids(images_of(payloads[i:i + batch_size]), config=config, stats=stats)
        predictor.drafter = None
        return ids, stats

    def one_by_one(speculative=None):
        predictor.drafter = drafters[speculative].reset() if speculative else None
        stats = SpeculationStats()
        ids = [predictor.generate_ids(images_of([p]), stats=stats)[0] for p in payloads]
        predictor.drafter = None
        return ids, stats

    run(2)  # warm-up: first calls allocate the caches and tables

    n = len(payloads)
    prefill_cfg = GenerationConfig(max_new_tokens=1)

    def row(mode, batch_size, seconds, ids, reference, base, **extra):
        tokens = sum(len(t) for t in ids)
        return {"mode": mode, "batch_size": batch_size, "seconds": seconds, "images_per_s": n / seconds,
                "tokens_per_s": tokens / seconds, "ms_per_image": 1e3 * seconds / n,
                "speedup": n / seconds / base, "outputs_equal": ids == reference, "tokens": tokens, **extra}

    def speculative_row(mode, drafter, batch_size, fn, plain, prefill, reference, base):
        """`plain`, `prefill`: (wall, cpu) seconds of plain greedy and of its prefill at this batch size."""
        seconds, cpu, (ids, stats) = best_of_with_cpu(args.repeats, fn)
        probe = drafters[drafter]
        return row(mode, batch_size, seconds, ids, reference, base, cpu_seconds=cpu, drafter=drafter,
                   vs_plain_same_batch=plain[0] / seconds, cpu_vs_plain_same_batch=plain[1] / cpu,
                   decode_vs_plain_same_batch=(plain[0] - prefill[0]) / max(seconds - prefill[0], 1e-9),
                   speculation=stats.summary(), draft_ms_per_image=1e3 * probe.seconds / n,
                   budget=probe.budget_summary(), missed=probe.missed(ids, predictor.tokenizer))

    seconds, cpu, (reference, _) = best_of_with_cpu(args.repeats, one_by_one)
    base = n / seconds
    results = [row("one-by-one", 1, seconds, reference, reference, base, cpu_seconds=cpu)]
    if drafters:
        prefill = best_of_with_cpu(args.repeats, lambda: run(1, prefill_cfg))[:2]
        results[0]["prefill_ms_per_image"] = 1e3 * prefill[0] / n
        for mode in drafters:
            results.append(speculative_row(f"one-by-one {mode}", mode, 1, lambda: one_by_one(mode),
                                           (seconds, cpu), prefill, reference, base))
    for batch_size in args.batch_sizes:
        seconds, cpu, (ids, _) = best_of_with_cpu(args.repeats, lambda: run(batch_size))
        prefill = best_of_with_cpu(args.repeats, lambda: run(batch_size, prefill_cfg))[:2]
        results.append(row("batched", batch_size, seconds, ids, reference, base, cpu_seconds=cpu,
                           prefill_ms_per_image=1e3 * prefill[0] / n))
        for mode in drafters:
            results.append(speculative_row(f"batched {mode}", mode, batch_size,
                                           lambda: run(batch_size, speculative=mode), (seconds, cpu), prefill,
                                           reference, base))

    with tempfile.TemporaryDirectory() as tmp:  # the whole file path, as predict_batch.py runs it
        tsv = Path(tmp) / "test.tsv"
        tsv.write_text("".join(f"{row.id}\t{row.image_b64}\n" for row in rows), encoding="utf-8")
        opts = PredictOptions(batch_size=16, progress=False)
        predictor.drafter = None
        seconds, _ = best_of(args.repeats, lambda: predict_tsv(predictor, tsv, Path(tmp) / "results.txt", opts))
        captions = [line.split("\t", 1)[1] for line in
                    (Path(tmp) / "results.txt").read_text(encoding="utf-8").splitlines()]
        tokens = sum(len(ids) for ids in reference)
        results.append({"mode": "predict_tsv (file)", "batch_size": 16, "seconds": seconds,
                        "images_per_s": n / seconds, "tokens_per_s": tokens / seconds,
                        "ms_per_image": 1e3 * seconds / n, "speedup": n / seconds / base,
                        "outputs_equal": captions == [predictor.decode(ids) for ids in reference],
                        "tokens": tokens})
    return {"threads": int(os.environ["OMP_NUM_THREADS"]), "prompt_tokens": len(predictor.prompt_ids),
            "paddle": paddle.__version__, "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="OMP thread counts, each in a fresh process")
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    parser.add_argument("--model", help="a trained model directory (default: the tiny config, random weights)")
    parser.add_argument("--speculative", default="none",
                        help="comma-separated drafters for speculative rows, from " + ", ".join(SPECULATIVE_MODES)
                             + " (needs --model: random weights accept no draft)")
    parser.add_argument("--draft-source", help="captions file or datastore (default: MODEL/draft_datastore)")
    parser.add_argument("--num-draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON report (default bench/results/predict.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    unknown = [m for m in args.speculative.split(",") if m not in SPECULATIVE_MODES]
    if unknown:
        parser.error(f"--speculative: unknown mode(s) {unknown} (choose from {', '.join(SPECULATIVE_MODES)})")
    if args.speculative != "none" and not args.model:
        parser.error("--speculative needs --model (a trained model: random weights accept no draft)")

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    start = time.perf_counter()
    load_before = os.getloadavg()
    runs = []
    for threads in [int(t) for t in args.threads.split(",")]:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--worker", "--batch-sizes", ",".join(map(str, args.batch_sizes)),
               "--images", str(args.images), "--max-new-tokens", str(args.max_new_tokens),
               "--repeats", str(args.repeats), "--speculative", args.speculative,
               "--num-draft-tokens", str(args.num_draft_tokens)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--draft-source", args.draft_source] if args.draft_source else []
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{threads} thread(s) done after {time.perf_counter() - start:.0f} s", flush=True)

    report = {
        "command": "python " + " ".join([f"bench/{Path(__file__).name}"] + sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "paddle": runs[0]["paddle"], "platform": platform.platform(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "model": ({"dir": args.model, "weights": "trained", "speculative": args.speculative,
                   "num_draft_tokens": args.num_draft_tokens, "draft_source": args.draft_source or "MODEL/draft_datastore",
                   "prompt_tokens": runs[0]["prompt_tokens"], "max_new_tokens": args.max_new_tokens}
                  if args.model else
                  {"config": "config/model/tiny.json", "weights": "random, paddle.seed(0)",
                   "prompt_tokens": runs[0]["prompt_tokens"], "max_new_tokens": args.max_new_tokens,
                   "stops": "never (random weights): every image generates max_new_tokens tokens"}),
        "images": args.images, "repeats": args.repeats, "runs": runs,
        "target": {"speedup_at_batch_16": TARGET_SPEEDUP_AT_16,
                   "speculative_vs_plain_at_batch_1": TARGET_SPECULATIVE[1],
                   "speculative_vs_plain_at_batch_16": TARGET_SPECULATIVE[16]},
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    m = report["machine"]
    model = f"model {args.model}" if args.model else "tiny model (random weights)"
    print(f"\n{m['cpu']}, {m['cores']} cores, paddle {m['paddle']}; {model}, "
          f"{runs[0]['prompt_tokens']} prompt tokens, at most {args.max_new_tokens} new tokens per image, "
          f"{args.images} images, best of {args.repeats}\n")
    print("| threads | mode | batch | images/s | tokens/s | ms/image | prefill ms/image | speed-up | outputs equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for r in run["results"]:
            prefill = f"{r['prefill_ms_per_image']:.0f}" if "prefill_ms_per_image" in r else "–"
            print(f"| {run['threads']} | {r['mode']} | {r['batch_size']} | {r['images_per_s']:.2f} | "
                  f"{r['tokens_per_s']:.0f} | {r['ms_per_image']:.0f} | {prefill} | {r['speedup']:.2f}× | "
                  f"{'yes' if r['outputs_equal'] else 'NO'} |")
    spec = [(run["threads"], r) for run in runs for r in run["results"] if "speculation" in r]
    if spec:
        print("\n| threads | mode | batch | vs plain, same batch | by CPU time | decode only | tokens per step | "
              "tokens per verify step | acceptance | drafting ms/image | plain / draft steps |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for threads, r in spec:
            st, budget = r["speculation"], r.get("budget") or {}
            per_verify = 1 + st["accepted_per_verify"]  # the row's own token + the accepted drafts
            print(f"| {threads} | {r['mode']} | {r['batch_size']} | {r['vs_plain_same_batch']:.2f}× | "
                  f"{r['cpu_vs_plain_same_batch']:.2f}× | "
                  f"{r['decode_vs_plain_same_batch']:.2f}× | {st['tokens_per_step']:.2f} | "
                  f"{per_verify:.2f} | {100 * st['acceptance_rate']:.1f}% | {r['draft_ms_per_image']:.1f} | "
                  f"{budget.get('plain_steps', '–')} / {budget.get('draft_steps', '–')} |")
        print("\nfirst wrong draft token (the true token there), most frequent:")
        for threads, r in spec:
            if r["batch_size"] == 1:
                print(f"- {threads} thread(s), {r['mode']}: " + ", ".join(
                    f"{tok!r} {count}" for tok, count in r["missed"]["first_wrong"]))
    print(f"\nwrote {args.out} ({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
