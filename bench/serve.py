"""Load-test the caption service: throughput and latency at several concurrencies, against the same
requests served one at a time, and against a direct `Predictor` call.

    python bench/serve.py [--model DIR] [--requests 32] [--concurrency 1,4,16,32] [--max-new-tokens 64]
        [--max-batch-size 32] [--out bench/results/serve.json]

The model is `--model`, else the demo model (checkpoints/demo/image/model) if `make demo` made it,
else config/model/tiny.json with random weights (paddle.seed(0)) saved to a temp dir — the report
says which. Random weights never emit a stop token, so every request generates exactly
`--max-new-tokens` tokens; the demo model stops at the end of its caption.

In one run, on 127.0.0.1:
1. direct: `Predictor.caption_batch` on each image alone (decode + preprocess included), in this
   process, before any server runs — the latency floor;
2. the service (`python -m paddle_caption.serve`, --max_batch_size B) loaded by `--requests`
   single-image `/v1/captions` requests at each concurrency (a closed loop: each client sends its
   next request when the previous one is answered): images/s, p50/p95 latency, and the batch sizes
   the engine formed (from /metrics: mean rows per decode step, the largest histogram bucket used,
   mean rows per prefill);
3. one at a time, the peers' way (Qwen-VL's openai_api.py serves one request at a time): the same
   requests sent sequentially to the service started with --max_batch_size 1.
Every caption is checked against the direct call's (greedy: they must be equal).
Targets: at concurrency 16 >= 3x the one-at-a-time throughput; p50 at concurrency 1 within 1.2x
the direct call. Prints a markdown table and writes bench/results/serve.json.

    python bench/serve.py --soak MINUTES [--model DIR] [--soak-concurrency 16] [--max-new-tokens 64]

instead runs the soak (bench/soak.py): mixed traffic (greedy, beam, sampling with n and
log-probs, streaming, bad requests, disconnecting clients) at concurrency 16 for MINUTES; per
minute p50/p99 latency, answers by status and the server's RSS, against the bars (0 5xx; RSS at
the end within 5% of minute 2's; the last minute's p99 within 20% of minute 2's). Writes
bench/results/serve_soak.json.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cpu_model, machine_info, write_report  # noqa: E402  (bench/ is on sys.path)

RESULTS = ROOT / "bench" / "results" / "serve.json"
DEMO_MODEL = ROOT / "checkpoints" / "demo" / "image" / "model"
TINY = ROOT / "config" / "model" / "tiny.json"
TARGET_SPEEDUP_AT_16 = 3.0
TARGET_P50_RATIO_AT_1 = 1.2


def pick_model(args, tmp: Path) -> tuple[Path, str]:
    if args.model:
        return Path(args.model), f"{args.model} (given)"
    if (DEMO_MODEL / "config.json").is_file():
        return DEMO_MODEL, "the trained demo model (checkpoints/demo/image/model)"
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    import paddle

    paddle.seed(0)
    MgenVLForCausalLM(MgenVLConfig.from_pretrained(TINY)).save_pretrained(tmp / "tiny")
    return tmp / "tiny", ("config/model/tiny.json with RANDOM weights (paddle.seed(0); no demo model found: "
                          "run `make demo` for the trained one)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def direct_latencies(model_dir: Path, payloads: list[str], max_new_tokens: int) -> tuple[list[float], list[str]]:
    """Each image captioned alone by a Predictor in this process (decode + preprocess included)."""
    from paddle_caption.data.images import b64decode_strict, decode_image
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.predict.predictor import load_predictor

    predictor = load_predictor(model_dir, GenerationConfig(max_new_tokens=max_new_tokens))

    def one(payload):
        return predictor.caption_batch([predictor.preprocess(decode_image(b64decode_strict(payload)))])[0]

    one(payloads[0])  # warm-up: caches and tables
    seconds, captions = [], []
    for payload in payloads:
        start = time.perf_counter()
        captions.append(one(payload))
        seconds.append(time.perf_counter() - start)
    return seconds, captions


class Server:
    """`python -m paddle_caption.serve` as a child process on a free 127.0.0.1 port."""

    def __init__(self, model_dir: Path, *flags: str):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "paddle_caption.serve", str(model_dir), "--port",
                                      str(self.port), "--log_level", "warning", *flags],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become healthy in 180 s")
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def histograms(self) -> dict:
        """{metric: {"sum", "count", "buckets": {le: cumulative count}}} of the batch-size histograms."""
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            for name in ("decode_batch_size", "prefill_batch_size"):
                prefix = f"paddle_caption_{name}_"
                if not line.startswith(prefix):
                    continue
                entry = out.setdefault(name, {"sum": 0.0, "count": 0.0, "buckets": {}})
                key, value = line.rsplit(" ", 1)
                if key.startswith(prefix + "bucket"):
                    entry["buckets"][key.split('le="')[1].rstrip('"}')] = float(value)
                elif key == prefix + "sum":
                    entry["sum"] = float(value)
                elif key == prefix + "count":
                    entry["count"] = float(value)
        return out


def batch_stats(before: dict, after: dict) -> dict:
    def delta(name):
        b, a = before.get(name, {}), after[name]
        count = a["count"] - b.get("count", 0.0)
        buckets = {le: a["buckets"][le] - b.get("buckets", {}).get(le, 0.0) for le in a["buckets"]}
        ordered = sorted(buckets, key=lambda le: float("inf") if le == "+Inf" else float(le))
        largest = next((le for le in ordered if buckets[le] >= count), "+Inf") if count else "-"
        return {"steps": int(count), "mean": (a["sum"] - b.get("sum", 0.0)) / count if count else 0.0,
                "largest_bucket": largest}

    return {"decode": delta("decode_batch_size"), "prefill": delta("prefill_batch_size")}


async def load(url: str, payloads: list[str], concurrency: int, max_new_tokens: int) -> tuple[float, list, list]:
    """Closed-loop load: `concurrency` clients share the requests. -> (seconds, latencies, captions)."""
    import httpx

    latencies: list[float] = [0.0] * len(payloads)
    captions: list[str | None] = [None] * len(payloads)
    next_index = iter(range(len(payloads)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            for i in next_index:
                start = time.perf_counter()
                r = await client.post("/v1/captions", json={"image": payloads[i], "max_new_tokens": max_new_tokens})
                latencies[i] = time.perf_counter() - start
                r.raise_for_status()
                captions[i] = r.json()[0]["caption"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, captions


def run_level(server: Server, mode: str, payloads, concurrency: int, args, reference) -> dict:
    before = server.histograms()
    seconds, latencies, captions = asyncio.run(load(server.url, payloads, concurrency, args.max_new_tokens))
    stats = batch_stats(before, server.histograms())
    return {"mode": mode, "concurrency": concurrency, "requests": len(payloads), "seconds": seconds,
            "images_per_s": len(payloads) / seconds, "p50_ms": 1e3 * percentile(latencies, 50),
            "p95_ms": 1e3 * percentile(latencies, 95), "batches": stats, "outputs_equal": captions == reference}


def warm_up(server: Server, payloads, concurrency: int, args, reference) -> None:
    """A fresh server's first pass over the requests is ~1.5x slower (allocator and cache growth:
    measured 150 vs 105 ms per request at concurrency 1); time the second."""
    n = min(len(payloads), max(8, concurrency))
    run_level(server, "warm-up", payloads[:n], concurrency, args, reference[:n])
    if concurrency > 1:
        run_level(server, "warm-up", payloads[:8], 1, args, reference[:8])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the demo model, else a random tiny model)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32, help="the service's --max_batch_size")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON report (default bench/results/serve.json)")
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="run the soak (bench/soak.py) instead")
    parser.add_argument("--soak-concurrency", type=int, default=16)
    args = parser.parse_args()
    if args.soak is not None:
        if not 0 < args.soak <= 120 or not 1 <= args.soak_concurrency <= 256:
            parser.error("need 0 < --soak <= 120 minutes and --soak-concurrency in 1..256 (the load is bounded)")
        return soak_main(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 2 or args.requests > 1000 or min(levels) < 1 or max(levels) > 256:
        parser.error("need 2 <= --requests <= 1000 and concurrencies in 1..256 (the load is bounded)")

    from paddle_caption.data.synthetic import generate_split
    from paddle_caption.runtime import configure

    configure()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no line per request
    start = time.perf_counter()
    load_before = os.getloadavg()
    payloads = [row.image_b64 for row in generate_split("test", args.requests, seed=0)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model_note = pick_model(args, Path(tmp))
        print(f"model: {model_note}", flush=True)
        direct, reference = direct_latencies(model_dir, payloads, args.max_new_tokens)
        direct_p50 = 1e3 * percentile(direct, 50)
        print(f"direct Predictor call: p50 {direct_p50:.0f} ms", flush=True)
        flags = ["--max_tokens_cap", str(max(args.max_new_tokens, 512)), "--max_queue", str(4 * args.requests)]
        results = []
        with Server(model_dir, "--max_batch_size", str(args.max_batch_size), *flags) as server:
            warm_up(server, payloads, max(levels), args, reference)
            for concurrency in levels:
                results.append(run_level(server, "service", payloads, concurrency, args, reference))
                print(f"concurrency {concurrency}: {results[-1]['images_per_s']:.2f} images/s", flush=True)
        with Server(model_dir, "--max_batch_size", "1", "--max_wait_ms", "0", *flags) as server:
            warm_up(server, payloads, 1, args, reference)
            one = run_level(server, "one at a time (--max_batch_size 1)", payloads, 1, args, reference)
            results.append(one)
            print(f"one at a time: {one['images_per_s']:.2f} images/s", flush=True)

    for r in results:
        r["speedup_vs_one_at_a_time"] = r["images_per_s"] / one["images_per_s"]
    by_level = {r["concurrency"]: r for r in results if r["mode"] == "service"}
    speedup_16 = by_level[16]["speedup_vs_one_at_a_time"] if 16 in by_level else None
    p50_ratio_1 = by_level[1]["p50_ms"] / direct_p50 if 1 in by_level else None
    report = {
        "command": "python " + " ".join(["bench/serve.py"] + sys.argv[1:]),
        "machine": machine_info(load_average_before=[round(x, 2) for x in load_before]),  # + load at the end
        "model": model_note, "max_new_tokens": args.max_new_tokens, "max_batch_size": args.max_batch_size,
        "direct_p50_ms": direct_p50, "results": results,
        "targets": {"speedup_at_16": TARGET_SPEEDUP_AT_16, "p50_ratio_at_1": TARGET_P50_RATIO_AT_1},
        "measured": {"speedup_at_16": speedup_16, "p50_ratio_at_1": p50_ratio_1},
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    write_report(args.out, report)

    print(f"\n{cpu_model()}, {os.cpu_count()} cores; {model_note}; {args.requests} single-image requests per "
          f"level, {args.max_new_tokens} max new tokens, service --max_batch_size {args.max_batch_size}\n")
    print("| mode | concurrency | images/s | p50 ms | p95 ms | rows/decode step (mean, largest bucket) | "
          "rows/prefill | vs one at a time | captions equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| direct Predictor call | 1 | {1e3 / direct_p50:.2f} | {direct_p50:.0f} | "
          f"{1e3 * percentile(direct, 95):.0f} | – | – | – | – |")
    for r in results:
        d, p = r["batches"]["decode"], r["batches"]["prefill"]
        print(f"| {r['mode']} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
              f"{d['mean']:.1f} (≤ {d['largest_bucket']}) | {p['mean']:.1f} | {r['speedup_vs_one_at_a_time']:.2f}× | "
              f"{'yes' if r['outputs_equal'] else 'NO'} |")
    if speedup_16 is not None:
        print(f"\nconcurrency 16: {speedup_16:.2f}× one at a time (target ≥ {TARGET_SPEEDUP_AT_16}×)")
    if p50_ratio_1 is not None:
        print(f"p50 at concurrency 1: {p50_ratio_1:.2f}× the direct call (target ≤ {TARGET_P50_RATIO_AT_1}×)")
    print(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")
    return 0


def soak_main(args) -> int:
    from soak import run_soak  # bench/ is on sys.path

    from paddle_caption.runtime import configure

    configure()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = RESULTS.with_name("serve_soak.json") if args.out == RESULTS else args.out
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model_note = pick_model(args, Path(tmp))
        return run_soak(Server, model_dir, model_note, args.soak, args.soak_concurrency, args.max_new_tokens, out,
                        write_report, machine_info, "python " + " ".join(["bench/serve.py"] + sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
