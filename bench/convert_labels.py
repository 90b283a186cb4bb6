"""Benchmark convert_labels against a naive pandas baseline on a >= 1 GB contest-format TSV.

    python bench/convert_labels.py [--workdir /tmp/paddle_caption_bench] [--size-gb 1.0]

Builds the TSV from a few hundred distinct images of the synthetic world (repeated under distinct
ids, all rows clean so every image is verified), then runs, each in a fresh process tree:
- our converter at 1 and 2 workers (default `--verify fast`), plus 2 workers with `--verify full`
  and `--verify header` (what image verification costs), and 2 workers on a quarter-size file (peak
  memory must not depend on the input size);
- the naive baseline: `pandas.read_csv` of the whole file, then a per-row base64 + full decode loop.
Measures rows/s, MB/s, the peak RSS of the largest process in the tree (getrusage RUSAGE_CHILDREN
through a wrapper process) and the peak sum of the tree's PSS (sampled from /proc every 50 ms).
Prints a markdown table and writes bench/results/convert_labels.json. The TSV stays in --workdir
(delete it yourself, or pass --cleanup); the page cache is warm, so disk speed is not measured.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "convert_labels.json"
TARGET_MB_S, TARGET_RSS_MB = 150.0, 300.0

# Run as `python -c WRAPPER cmd...`: runs cmd and reports the peak RSS of its whole process tree
# (children's rusage includes their own reaped children, e.g. pool workers).
WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
seconds = time.perf_counter() - t0
print(json.dumps({"rc": rc, "seconds": seconds,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

BASELINE = """
import base64, csv, sys
import pandas as pd
from paddle_caption.data.images import ImageRejected, decode_image
df = pd.read_csv(sys.argv[1], sep="\\t", header=None, names=["id", "image", "caption"], dtype=str,
                 quoting=csv.QUOTE_NONE, keep_default_na=False, encoding="utf-8")
kept = []
for rid, image, caption in zip(df["id"], df["image"], df["caption"]):
    try:
        img = decode_image(base64.b64decode(image, validate=True), verify=True, min_side=32)
    except (ImageRejected, ValueError):
        continue
    kept.append((rid, caption, img.size))
print(len(kept))
"""


def distinct_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """(base64, caption) of n clean synthetic-world images."""
    from paddle_caption.data.synthetic import generate_split

    return [(row.image_b64, row.caption) for row in generate_split("val", n, seed, workers=2)]


def build_tsv(path: Path, target_bytes: int, rows: list[tuple[str, str]]) -> tuple[int, int]:
    """Write rows cyclically under distinct ids until the file reaches target_bytes; (rows, bytes)."""
    n = size = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        while size < target_bytes:
            b64, caption = rows[n % len(rows)]
            line = f"bench_{n:09d}\t{b64}\t{caption}\n".encode("utf-8")
            handle.write(line)
            size += len(line)
            n += 1
    os.replace(tmp, path)
    return n, size


def _tree_pss_mb(root: int) -> float:
    """Sum of PSS (RSS if unavailable) over `root` and its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total_kb, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
            try:
                with open(f"/proc/{pid}/{name}") as handle:
                    kb = next((int(l.split()[1]) for l in handle if l.startswith(key)), None)
            except OSError:
                continue
            if kb is not None:
                total_kb += kb
                break
    return total_kb / 1024


def measure(cmd: list[str]) -> dict:
    """Run cmd in a wrapper process; wall time, peak RSS (largest process), peak tree PSS (sampled)."""
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER] + cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss_mb(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    result = json.loads(out.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"benchmark command failed ({result['rc']}): {' '.join(cmd)}")
    result["tree_pss_peak_mb"] = peak[0]
    return result


def verify_cost(rows: list[tuple[str, str]], repeats: int = 3) -> dict:
    """Milliseconds per image for each verification mode, on the distinct images."""
    from paddle_caption.data.images import VERIFY_MODES, b64decode_strict, probe_image

    images = [base64.b64decode(b64) for b64, _ in rows]
    out = {}
    for mode in VERIFY_MODES:
        t0 = time.perf_counter()
        for _ in range(repeats):
            for data in images:
                probe_image(data, verify=mode)
        out[mode] = round((time.perf_counter() - t0) / (repeats * len(images)) * 1e3, 4)
    # What the converter uses (pybase64), and the standard library it replaced.
    for name, decode in (("base64_decode", b64decode_strict),
                         ("base64_stdlib", lambda payload: base64.b64decode(payload, validate=True))):
        t0 = time.perf_counter()
        for _ in range(repeats):
            for b64, _ in rows:
                decode(b64)
        out[name] = round((time.perf_counter() - t0) / (repeats * len(rows)) * 1e3, 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/paddle_caption_bench", help="where the TSV and outputs go")
    parser.add_argument("--size-gb", type=float, default=1.0, help="TSV size in GB (default 1.0)")
    parser.add_argument("--distinct", type=int, default=300, help="distinct rendered images (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the pandas baseline")
    parser.add_argument("--cleanup", action="store_true", help="delete the TSVs afterwards")
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = distinct_rows(args.distinct, args.seed)
    big, small = work / "bench.tsv", work / "bench_quarter.tsv"
    n_rows, n_bytes = build_tsv(big, int(args.size_gb * 1e9), rows)
    n_small, small_bytes = build_tsv(small, int(args.size_gb * 1e9 / 4), rows)
    print(f"built {big}: {n_rows:,} rows, {n_bytes / 1e9:.2f} GB ({n_bytes / n_rows / 1e3:.1f} kB/row, "
          f"{args.distinct} distinct images) in {time.perf_counter() - t0:.0f} s", flush=True)

    tool = [sys.executable, "tools/convert_labels.py"]
    runs = [
        ("convert_labels (verify fast)", 1, big, n_rows, n_bytes, tool + [str(big), str(work / "out_w1"), "--workers", "1"]),
        ("convert_labels (verify fast)", 2, big, n_rows, n_bytes, tool + [str(big), str(work / "out_w2"), "--workers", "2"]),
        ("convert_labels (verify full)", 2, big, n_rows, n_bytes,
         tool + [str(big), str(work / "out_full"), "--workers", "2", "--verify", "full"]),
        ("convert_labels (verify header)", 2, big, n_rows, n_bytes,
         tool + [str(big), str(work / "out_header"), "--workers", "2", "--verify", "header"]),
        ("convert_labels (verify fast), 1/4-size input", 2, small, n_small, small_bytes,
         tool + [str(small), str(work / "out_quarter"), "--workers", "2"]),
    ]
    if not args.no_baseline:
        runs.append(("naive pandas.read_csv + per-row full decode", 1, big, n_rows, n_bytes,
                     [sys.executable, "-c", BASELINE, str(big)]))
    results = []
    for name, workers, path, n, size, cmd in runs:
        print(f"running: {name}, {workers} worker(s) ...", flush=True)
        m = measure(cmd + (["--quiet"] if "tools/convert_labels.py" in cmd else []))
        results.append({"name": name, "workers": workers, "input_bytes": size, "rows": n,
                        "seconds": round(m["seconds"], 2), "mb_per_s": round(size / 1e6 / m["seconds"], 1),
                        "rows_per_s": round(n / m["seconds"], 0), "max_rss_mb": round(m["max_rss_mb"], 1),
                        "tree_pss_peak_mb": round(m["tree_pss_peak_mb"], 1),
                        "command": " ".join(str(c) for c in cmd if c != BASELINE).replace(sys.executable, "python")})
    outputs = [(work / d / "records.jsonl").read_bytes() for d in ("out_w1", "out_w2", "out_full")]
    costs = verify_cost(rows)

    from PIL import __version__ as pil_version, features

    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "pillow": pil_version, "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo"))},
        "input": {"rows": n_rows, "bytes": n_bytes, "bytes_per_row": round(n_bytes / n_rows),
                  "distinct_images": args.distinct, "page_cache": "warm"},
        "verify_ms_per_image": costs,
        "identical_records_w1_w2_full": outputs[0] == outputs[1] == outputs[2],
        "results": results,
        "targets": {"mb_per_s_2_workers": TARGET_MB_S, "peak_rss_mb": TARGET_RSS_MB},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\ninput: {n_rows:,} rows, {n_bytes / 1e9:.2f} GB, {n_bytes / n_rows / 1e3:.1f} kB/row; "
          f"{os.cpu_count()} CPUs; warm page cache\n")
    print("| run | workers | rows/s | MB/s | peak RSS, largest process (MB) | peak PSS, process tree (MB) | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['workers']} | {r['rows_per_s']:,.0f} | {r['mb_per_s']:,.1f} | {r['max_rss_mb']:.0f} "
              f"| {r['tree_pss_peak_mb']:.0f} | {r['seconds']:.1f} |")
    print("\nverification cost per image (ms): " + ", ".join(f"{k} {v}" for k, v in costs.items()))
    print(f"records identical across 1/2 workers and verify full/fast: {report['identical_records_w1_w2_full']}")
    print(f"wrote {RESULTS}")
    if args.cleanup:
        big.unlink()
        small.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
