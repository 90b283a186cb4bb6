"""What decoding a large photo at a reduced scale saves: a 24 MP JPEG (6000x4000, textured like a
photo, quality 90) through `images.decode_image` at its default (JPEG DCT scaling down to >= 1024 a
side), at decode_side=448 (what the model reads), and in full (decode_side=0, what the old code did
before refusing it), each followed by the model's preprocessing to 448x448; and the peak RSS each
decode adds, each in a fresh process (ru_maxrss is a high-water mark).

    python bench/images.py [--repeats 5]

Prints a table and writes bench/results/images.json.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys

from common import RESULTS_DIR, ROOT, best_of_with_cpu, command_line, machine_info, write_report

CASES = [("default (decode_side 1024)", 1024), ("decode_side 448", 448), ("full decode (decode_side 0)", 0)]

# VmHWM (this process's peak RSS), not ru_maxrss: a child's ru_maxrss starts at its parent's.
RSS_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from paddle_caption.data.images import decode_image, preprocess_image
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
data = open({path!r}, "rb").read()
base = hwm()
preprocess_image(decode_image(data, decode_side={side}), 448)
print((hwm() - base) / 1024)
"""


def make_photo(path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, size=(500, 750, 3), dtype=np.uint8))
    out = io.BytesIO()
    small.resize((6000, 4000), Image.BICUBIC).save(out, "JPEG", quality=90)
    path.write_bytes(out.getvalue())
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/paddle_caption_bench_images")
    args = parser.parse_args()
    from pathlib import Path

    from paddle_caption.data.images import decode_image, preprocess_image

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    photo = work / "photo_24mp.jpg"
    data = make_photo(photo)
    rows = []
    for name, side in CASES:
        wall, cpu, img = best_of_with_cpu(args.repeats, lambda: decode_image(data, decode_side=side))
        pre_wall, pre_cpu, _ = best_of_with_cpu(args.repeats, lambda: preprocess_image(decode_image(data, decode_side=side), 448))
        rss = float(subprocess.run([sys.executable, "-c", RSS_SCRIPT.format(root=str(ROOT), path=str(photo), side=side)],
                                   capture_output=True, text=True, check=True).stdout.strip())
        rows.append({"case": name, "decode_side": side, "decoded_size": list(img.size),
                     "decode_ms": round(wall * 1e3, 1), "decode_cpu_ms": round(cpu * 1e3, 1),
                     "decode_and_preprocess_ms": round(pre_wall * 1e3, 1),
                     "decode_and_preprocess_cpu_ms": round(pre_cpu * 1e3, 1), "peak_rss_added_mb": round(rss, 1)})
    report = {"command": command_line(), "machine": machine_info(), "photo": {"size": [6000, 4000], "bytes": len(data)},
              "repeats": args.repeats, "rows": rows}
    write_report(RESULTS_DIR / "images.json", report)
    print(f"24 MP JPEG ({len(data) / 1e6:.1f} MB), best of {args.repeats}; load average {report['machine']['load_average']}")
    print("| decode | decoded size | decode ms (CPU) | + preprocess to 448 ms (CPU) | peak RSS added MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['decoded_size'][0]}x{r['decoded_size'][1]} | {r['decode_ms']} ({r['decode_cpu_ms']}) | "
              f"{r['decode_and_preprocess_ms']} ({r['decode_and_preprocess_cpu_ms']}) | {r['peak_rss_added_mb']} |")
    print(json.dumps(report["machine"]))


if __name__ == "__main__":
    main()
