"""The example recipe's non-model operations at scale: rows/s per core and peak RSS per process.

    python bench/curate.py --rows 50000                    # generate (once) and curate in one process
    python bench/curate.py --rows 50000 --nproc 2          # the same under paddle.distributed.launch
    python bench/curate.py --rows 50000 --kill_every 20    # then SIGKILLed 3 times, ~20 s apart: same bytes?

Rows are generated (not rendered by the synthetic world, which takes ~25 ms a row): N distinct
256x256 JPEG images (a gradient, rectangles and noise drawn from a per-row seed, quality 85, ~6 kB),
each with a caption drawn from the formulaic captions of `paddle_caption.data.synthetic`'s grammar
(so captions repeat across images, as ad captions do), written straight as a contest TSV and its
records.jsonl. 3% of the rows repeat an earlier row's image and caption (an exact pair), 3% a
re-encoded copy of one (JPEG quality 70, a near pair), 5% repeat an earlier row's caption on their
own image (not a duplicate), 2% an earlier row's image with another caption (a second reference).

The recipe is config/curate/example.json's first six operations (shape, aspect ratio and caption
length filters, exact and near image dedup, near caption dedup), as given there. Every run starts
from an empty export directory and is timed as a whole (child process, wall clock and CPU seconds
of the process tree); peak RSS is the largest VmHWM of the processes, sampled every 0.2 s.
Results go to bench/results/curate_<rows>_<nproc>.json and print as a table row.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import RESULTS_DIR, ROOT, command_line, machine_info, write_report

EXACT, NEAR, SAME_CAPTION, SECOND_REFERENCE = 0.03, 0.03, 0.05, 0.02


def _image(seed: int, quality: int = 85) -> bytes:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = np.linspace(rng.integers(0, 255, 3), rng.integers(0, 255, 3), 256, dtype=np.float32)
    # float32 noise (not float64): the generator, not the curation, was the slow half of a 200k run
    noise = rng.standard_normal((256, 256, 3), dtype=np.float32)
    noise *= 6
    noise += base[:, None, :]
    img = Image.fromarray(np.clip(noise, 0, 255, out=noise).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, 200, 2))
        draw.rectangle([x0, y0, x0 + int(rng.integers(20, 56)), y0 + int(rng.integers(20, 56))],
                       fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _image_job(args: tuple[int, int]) -> bytes:
    return _image(*args)


def _captions(n: int, seed: int) -> list[str]:
    """Formulaic ad captions: style, layout, colours and shapes, background (the synthetic world's words)."""
    import numpy as np

    styles = ["卡通风格", "水彩风格", "3D风格", "扁平风格", "像素风格", "黑白简笔风格", "油画风格", "剪纸风格"]
    colours = ["红色", "蓝色", "绿色", "黄色", "紫色", "橙色", "粉色", "黑色"]
    shapes = ["圆形", "三角形", "五角星", "菱形", "正方形", "心形", "六边形", "月亮"]
    backgrounds = ["白色", "米色", "黑色", "灰色", "浅蓝色"]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s, b = styles[rng.integers(len(styles))], backgrounds[rng.integers(len(backgrounds))]
        c1, c2 = colours[rng.integers(len(colours))], colours[rng.integers(len(colours))]
        h1, h2 = shapes[rng.integers(len(shapes))], shapes[rng.integers(len(shapes))]
        if rng.random() < 0.5:
            out.append(f"{s}。图片中间是一个{c1}的{h1}，背景是{b}。")
        else:
            out.append(f"{s}。图片左边是一个{c1}的{h1}，右边是一个{c2}的{h2}，背景是{b}。")
    return out


def generate(work: Path, rows: int, seed: int = 0) -> Path:
    """TSV + records.jsonl of `rows` generated rows (kept: a rerun with the same count reuses them)."""
    import numpy as np

    records = work / f"rows_{rows}" / "records.jsonl"
    if records.is_file():
        return records
    records.parent.mkdir(parents=True, exist_ok=True)
    tsv = records.with_name("train.tsv")
    rng = np.random.default_rng(seed)
    captions = _captions(rows, seed)
    kinds = rng.choice(5, size=rows, p=[1 - EXACT - NEAR - SAME_CAPTION - SECOND_REFERENCE, EXACT, NEAR,
                                        SAME_CAPTION, SECOND_REFERENCE])
    kinds[:100] = 0
    plan = []  # (image seed, JPEG quality, caption) per row, drawn in row order so a rerun is identical
    for i in range(rows):
        kind, donor = int(kinds[i]), int(rng.integers(0, max(1, i)))
        image_seed, caption, quality = i, captions[i], 85
        if kind in (1, 2, 4):
            image_seed = donor
        if kind in (1, 2, 3):
            caption = captions[donor]
        if kind == 2:
            quality = 70
        if kind == 4:
            caption = captions[(donor + 1) % rows] if captions[(donor + 1) % rows] != captions[donor] else captions[i]
        plan.append((image_seed, quality, caption))
    offset = 0
    # The images are drawn in worker processes (every core; ordered, so the file is the same for any count)
    partial = records.with_suffix(".partial")  # renamed when complete: a killed generation is redone
    with open(tsv, "wb") as out_tsv, open(partial, "w", encoding="utf-8") as out_rec, \
            multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        images = pool.imap(_image_job, [(seed_, quality) for seed_, quality, _ in plan], chunksize=256)
        for i, ((_, _, caption), image) in enumerate(zip(plan, images)):
            row_id = f"row_{i:07d}"
            line = f"{row_id}\t".encode() + base64.b64encode(image) + f"\t{caption}".encode()
            out_tsv.write(line + b"\n")
            out_rec.write(json.dumps({"id": row_id, "caption": caption, "tsv": str(tsv), "offset": offset,
                                      "length": len(line), "width": 256, "height": 256}, ensure_ascii=False) + "\n")
            offset += len(line) + 1
    partial.rename(records)
    return records


def _tree_hwm_mb(pid: int) -> list[float]:
    """VmHWM (peak RSS) of `pid` and its descendants, in MB."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            out.append(int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) / 1024)
            for task in Path(f"/proc/{p}/task").iterdir():
                children = (task / "children").read_text().split()
                todo += [int(c) for c in children]
        except (OSError, StopIteration):
            continue
    return out


def run(records: Path, export: Path, nproc: int) -> dict:
    recipe = json.loads((ROOT / "config/curate/example.json").read_text())
    recipe.update(dataset=str(records), export_dir=str(export), process=recipe["process"][:6])
    recipe_path = export.with_suffix(".recipe.json")
    recipe_path.write_text(json.dumps(recipe, ensure_ascii=False))
    shutil.rmtree(export, ignore_errors=True)
    tool = [str(ROOT / "tools/curate.py"), str(recipe_path), "--no_progress"]
    cmd = [sys.executable] + (["-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
                               "--log_dir", str(export) + "_logs"] if nproc > 1 else []) + tool
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    peak: dict[int, float] = {}
    t0, c0 = time.perf_counter(), os.times()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample():
        while proc.poll() is None:
            for i, mb in enumerate(sorted(_tree_hwm_mb(proc.pid), reverse=True)):
                peak[i] = max(peak.get(i, 0.0), mb)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - t0
    c1 = os.times()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"curation failed:\n{output[-3000:]}")
    summary = json.loads((export / "summary.json").read_text())
    stages = [{"op": s["op"], "kept": s["kept"], "dropped": s["dropped"], "reasons": s["dropped_by_reason"],
               "seconds": s["seconds"], "index_bytes": s["info"].get("index_bytes")} for s in summary["stages"]]
    return {"wall_seconds": round(wall, 1), "cpu_seconds": round((c1.children_user + c1.children_system)
                                                                  - (c0.children_user + c0.children_system), 1),
            "peak_rss_mb_by_process": [round(v, 1) for _, v in sorted(peak.items())],
            "input_rows": summary["input_rows"], "output_rows": summary["output"]["rows"], "stages": stages}


def killed_run(records: Path, export: Path, reference: Path, every: float, kills: int, seed: int = 0) -> dict:
    """The same one-process run SIGKILLed after a random 0.5-1.5 x `every` seconds, `kills` times,
    each restart resuming (`tools/curate.py` reruns only what is not done), then left to complete;
    its records.jsonl and ledger.jsonl against the uninterrupted run's (`reference`), byte for byte.
    (The deduplicators' hash passes resume inside their stage; the filters' short passes restart, so
    the kills are counted rather than left to go on until one run outlives the interval.)"""
    import random
    import signal

    recipe_path = reference.with_suffix(".recipe.json")
    recipe = json.loads(recipe_path.read_text())
    recipe["export_dir"] = str(export)
    killed_recipe = export.with_suffix(".recipe.json")
    killed_recipe.write_text(json.dumps(recipe, ensure_ascii=False))
    shutil.rmtree(export, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tools/curate.py"), str(killed_recipe), "--no_progress"]
    rng, kills, kills_wanted, t0 = random.Random(seed), [], kills, time.perf_counter()
    while True:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=every * rng.uniform(0.5, 1.5) if len(kills) < kills_wanted else None)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            work = export / "work"
            stages = sorted(p.name for p in work.iterdir()) if work.is_dir() else []
            done = sum((work / name / "done.json").is_file() for name in stages)
            # where it died: the newest stage directory, and whether its decision had been written
            kills.append({"after_s": round(time.perf_counter() - t0, 1), "stage": stages[-1] if stages else None,
                          "stages_done": done})
            print(f"  killed at {kills[-1]}", flush=True)
            continue
        if proc.returncode:
            raise SystemExit(f"the resumed run failed:\n{proc.stdout.read().decode()[-3000:]}")
        break
    same = {name: (export / name).read_bytes() == (reference / name).read_bytes()
            for name in ("records.jsonl", "ledger.jsonl")}
    return {"kill_every_s": every, "kills": kills, "wall_seconds": round(time.perf_counter() - t0, 1),
            "byte_identical": same}


def index_scale(rows: int) -> dict:
    """The dedup ops' decisions alone (`select`, their indexes) on `rows` generated fingerprints,
    streamed (no decode): what grows with the rows at the contest's million. Each op's statistics are
    made up as compute_stats would write them (random phash words, a caption from the formulaic
    grammar, its sha1 and MinHash LSH band keys), 3% of rows repeating an earlier row's pair."""
    import hashlib
    from pathlib import Path as P

    import numpy as np

    from paddle_caption.curate.fingerprints import caption_sha1
    from paddle_caption.curate.ops import OpContext, build_op

    hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024  # noqa: E731
    recipe = json.loads((ROOT / "config/curate/example.json").read_text())["process"][3:6]
    ops = [build_op(entry, OpContext(work_dir=P("/tmp")), "bench") for entry in recipe]
    for op in ops:
        op.plan(ops)
    captions = _captions(4096, 1)
    near_op = ops[2]

    def samples(seed):
        rng = np.random.default_rng(seed)
        for i in range(rows):
            j = int(rng.integers(0, i)) if i and rng.random() < 0.03 else i  # a repeated pair
            r = np.random.default_rng(j)
            stats = {"image_sha1": hashlib.sha1(str(j).encode()).hexdigest()[:24],
                     "phash_16": r.bytes(32).hex()}
            sample = {"id": f"row_{i:07d}", "caption": captions[int(r.integers(len(captions)))], "tsv": "x",
                      "offset": i, "stats": stats}
            caption_sha1(sample)
            yield sample

    out = {"rows": rows, "vmhwm_start_mb": round(hwm(), 1), "ops": []}
    for op in ops:
        t0, c0 = time.perf_counter(), time.process_time()
        def read(op=op):
            for s in samples(0):
                if op is near_op:
                    op.compute_stats(s)  # the MinHash bands (jieba words cached per caption)
                yield s
        dropped = sum(reason is not None for _, reason in op.select(read))
        out["ops"].append({"op": op.name, "dropped": dropped, "index_bytes": op.info["index_bytes"],
                           "index_bytes_per_row": round(op.info["index_bytes"] / rows, 1),
                           "seconds": round(time.perf_counter() - t0, 1), "cpu": round(time.process_time() - c0, 1),
                           "vmhwm_mb": round(hwm(), 1)})
        print(out["ops"][-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--nproc", type=int, default=1, help="processes (paddle.distributed.launch when > 1)")
    parser.add_argument("--workdir", default="/tmp/paddle_caption_bench_curate")
    parser.add_argument("--index_only", action="store_true",
                        help="only the dedup ops' decisions on generated fingerprints (no images): their memory at --rows")
    parser.add_argument("--kill_every", type=float, default=0.0,
                        help="then rerun it SIGKILLed every ~S seconds (resuming each time) and compare the output")
    parser.add_argument("--kills", type=int, default=3, help="how many times --kill_every kills the run")
    args = parser.parse_args()
    if args.index_only:
        report = {"command": command_line(), "machine": machine_info(), **index_scale(args.rows)}
        write_report(RESULTS_DIR / f"curate_index_{args.rows}.json", report)
        print(json.dumps(report["machine"]))
        return
    work = Path(args.workdir)
    t0 = time.perf_counter()
    records = generate(work, args.rows)
    generate_seconds = time.perf_counter() - t0
    result = run(records, work / f"out_{args.rows}_{args.nproc}", args.nproc)
    rows_per_s = result["input_rows"] / result["wall_seconds"]
    op_cpu = sum(s["seconds"]["cpu"] for s in result["stages"])
    op_wall = sum(s["seconds"]["stats"] + s["seconds"]["decide"] for s in result["stages"])
    report = {"command": command_line(), "machine": machine_info(), "rows": args.rows, "nproc": args.nproc,
              "generate_seconds": round(generate_seconds, 1), **result,
              "rows_per_s": round(rows_per_s, 1), "ops_wall_seconds": round(op_wall, 1),
              "ops_cpu_seconds_rank0": round(op_cpu, 1),
              "ops_rows_per_cpu_second_rank0": round(result["input_rows"] / max(op_cpu, 1e-9), 1),
              "rows_per_cpu_second": round(result["input_rows"] / max(result["cpu_seconds"], 1e-9), 1)}
    if args.kill_every:
        report["killed_run"] = killed_run(records, work / f"out_{args.rows}_{args.nproc}_killed",
                                          work / f"out_{args.rows}_{args.nproc}", args.kill_every, args.kills)
        print(f"killed {len(report['killed_run']['kills'])} times; byte-identical to the uninterrupted run: "
              f"{report['killed_run']['byte_identical']}")
    write_report(RESULTS_DIR / f"curate_{args.rows}_{args.nproc}.json", report)
    print(f"| {args.rows} | {args.nproc} | {result['wall_seconds']} | {result['cpu_seconds']} | {rows_per_s:.0f} | "
          f"{report['rows_per_cpu_second']:.0f} | {max(result['peak_rss_mb_by_process'] or [0]):.0f} | "
          f"{result['output_rows']} | ops {op_wall:.1f} s wall, {op_cpu:.1f} s CPU on rank 0: "
          f"{report['ops_rows_per_cpu_second_rank0']:.0f} rows/CPU-s | {report['machine']['load_average']} |")
    for s in result["stages"]:
        print(f"  {s['op']}: kept {s['kept']}, dropped {s['dropped']} {s['reasons']} {s['seconds']} "
              f"index {s['index_bytes']} B")


if __name__ == "__main__":
    main()
