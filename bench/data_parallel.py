"""Training throughput on CPU: 2 data-parallel processes x 1 thread vs 1 process x 2 threads.

    python bench/data_parallel.py [--steps 30] [--warmup 5] [--out bench/results/data_parallel.json]

`config/demo.json` as `make demo` trains it (tiny model, batch 8 per process, vision tower frozen),
on freshly generated synthetic ads; each setting is the real command in a fresh process:

- `dp 2x1`: `python -m paddle.distributed.launch --nproc_per_node 2 supervised_finetune.py
  config/demo.json --num_threads 1` (gloo; 2 x 8 samples a step, one gradient all-reduce a step);
- `1x2`: `python supervised_finetune.py config/demo.json --num_threads 2` (8 samples a step);
- `1x1`: the same with one thread, the reference.

samples/s is measured from the run's own log (rank 0's clock): samples trained between step
`--warmup` and the last step over the time between them, so start-up, the first steps and the
final evaluation are excluded.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, RESULTS_DIR, command_line, machine_info, write_report

PY = sys.executable
SETTINGS = {
    "dp 2x1": {"launch": True, "threads": 1},
    "1x2": {"launch": False, "threads": 2},
    "1x1": {"launch": False, "threads": 1},
}


def make_data(tmp: Path, n: int) -> dict:
    for cmd in ([PY, "-m", "paddle_caption", "make-data", str(tmp / "data"), "--train", str(n), "--val", "8",
                 "--test", "1", "--workers", "1", "--quiet"],
                [PY, "-m", "paddle_caption", "convert", str(tmp / "data/train.tsv"), str(tmp / "train"), "--quiet"],
                [PY, "-m", "paddle_caption", "convert", str(tmp / "data/val.tsv"), str(tmp / "val"), "--quiet"]):
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return {"train": tmp / "train/records.jsonl", "val": tmp / "val/records.jsonl"}


def run_setting(name: str, setting: dict, data: dict, tmp: Path, steps: int, warmup: int) -> dict:
    out = tmp / name.replace(" ", "_")
    train = ["supervised_finetune.py", "config/demo.json", "--train_records", str(data["train"]),
             "--val_records", str(data["val"]), "--output_dir", str(out), "--max_steps", str(steps),
             "--max_train_minutes", "0", "--eval_minutes", "0", "--save_minutes", "0",
             "--eval_caption_samples", "0", "--eval_loss_samples", "4", "--logging_steps", "1",
             "--num_threads", str(setting["threads"]), "--progress", "false"]
    if setting["launch"]:
        cmd = [PY, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(out) + "-logs", *train]
    else:
        cmd = [PY, *train]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    records = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    by_step = {r["step"]: r for r in records}
    world = 2 if setting["launch"] else 1
    samples_per_step = 8 * world
    seconds = by_step[steps]["elapsed_s"] - by_step[warmup]["elapsed_s"]
    rate = samples_per_step * (steps - warmup) / seconds
    return {"processes": world, "threads_per_process": setting["threads"], "samples_per_step": samples_per_step,
            "timed_steps": steps - warmup, "seconds": round(seconds, 2), "samples_per_s": round(rate, 2),
            "ms_per_step": round(1000 * seconds / (steps - warmup), 1),
            "final_loss": by_step[steps]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    parser.add_argument("--train", type=int, default=600, help="synthetic training images")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "data_parallel.json")
    args = parser.parse_args()
    load_before = machine_info()["load_average"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args.train)
        for name, setting in SETTINGS.items():
            results[name] = run_setting(name, setting, data, Path(tmp), args.steps, args.warmup)
            print(f"{name:>7}: {results[name]['samples_per_s']:.2f} samples/s "
                  f"({results[name]['ms_per_step']:.0f} ms per step of {results[name]['samples_per_step']})",
                  flush=True)
    base = results["1x2"]["samples_per_s"]
    report = {"command": command_line(), "machine": machine_info(load_average_before=load_before),
              "config": "config/demo.json", "steps": args.steps, "warmup": args.warmup, "results": results,
              "dp_2x1_over_1x2": round(results["dp 2x1"]["samples_per_s"] / base, 3)}
    write_report(args.out, report)
    print(f"dp 2x1 / 1x2 = {report['dp_2x1_over_1x2']:.2f}x; load average before {load_before}, "
          f"after {report['machine']['load_average']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
