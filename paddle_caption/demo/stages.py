"""The demos' stages: each one a user-facing command run in a fresh process, as a user would run it.

`pipeline.py` (`make demo`), `compare_modes.py` and `curate_demo.py` are built from these: synthetic
data, conversion, concurrent training runs, merge, concurrent prediction and scoring. A stage whose
outputs exist is skipped, so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write
from ..runtime import UserError


def command(name: str) -> list[str]:
    """A kit command run as a user would run it, in a fresh process (`python -m paddle_caption NAME`);
    the same code as the top-level scripts (`supervised_finetune.py`, `tools/convert_labels.py`, ...)."""
    return [sys.executable, "-m", "paddle_caption", name]


def run_command(cmd: list[str], log_path: Path | None = None) -> None:
    """Run a stage's command; on failure, raise with the tail of its output."""
    if log_path is None:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = done.stdout
    else:
        with open(log_path, "w", encoding="utf-8") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        output = log_path.read_text(encoding="utf-8", errors="replace")
    if done.returncode != 0:
        raise UserError(f"stage failed: {' '.join(cmd[2:4])} …: {last_line(output)}")


def _reap(proc: subprocess.Popen):
    """`proc.poll()` that also returns the finished child's resource usage (os.wait4), or None."""
    if proc.returncode is not None:
        return proc.returncode, None
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None, None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def make_data(out: Path, counts: dict, seed: int, extra: list[str] | None = None) -> bool:
    """The synthetic world in out/data (make-data with `extra` flags); False if it is already there.
    Converted splits of an older dataset are invalidated: their records point at other bytes."""
    data = out / "data"
    stamp = data / "demo_data.json"
    wanted = {**counts, "seed": seed, **({"extra": extra} if extra else {})}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return False
    run_command([*command("make-data"), str(data), *(a for k, n in counts.items() for a in (f"--{k}", str(n))),
                 "--seed", str(seed), "--quiet", *(extra or [])])
    for stale in ("train", "val"):
        (out / stale / "summary.json").unlink(missing_ok=True)
    with atomic_write(stamp) as handle:
        json.dump(wanted, handle)
    return True


def convert_split(tsv: Path, target: Path) -> None:
    """convert_labels.py TSV -> target/records.jsonl, unless done."""
    if not (target / "summary.json").is_file():
        run_command([*command("convert"), str(tsv), str(target), "--quiet"])


RESOURCES_FILE = "train_resources.json"  # peak RSS of a run's training process


@dataclass
class TrainRun:
    run_dir: Path
    train_records: Path
    extra: list  # more `--key value` overrides


def train_runs(config: Path, runs: dict, val_records: Path, minutes: float, max_steps: int | None,
               log=print, labels: dict | None = None, concurrent: int = 2) -> dict:
    """Train every TrainRun as `supervised_finetune.py` (a fresh process, the config's threads),
    `concurrent` at a time, under one progress bar; runs whose final checkpoint exists are skipped.
    Each finished process's peak RSS goes to run_dir/train_resources.json. Returns {name: train_summary}."""
    from tqdm import tqdm

    labels = labels or {}
    pending = [name for name, run in runs.items() if not (run.run_dir / "final" / "trainer_state.json").is_file()]
    total = int(minutes * 60) if minutes > 0 else None
    bar = tqdm(total=total, unit="s", dynamic_ncols=True, file=sys.stderr,
               bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s {postfix}")
    active, failed = {}, []
    try:
        while pending or active:
            while pending and len(active) < concurrent:
                name = pending.pop(0)
                active[name] = _start_training(config, runs[name], val_records, minutes, max_steps)
            time.sleep(2)
            latest = {name: _last_record(runs[name].run_dir / "log.jsonl", "train") for name in active}
            elapsed = max((r.get("elapsed_s", 0) for r in latest.values() if r), default=0)
            bar.n = min(elapsed, total) if total else elapsed
            bar.set_postfix_str("  ".join(f"{name} step {r['step']} loss {r['loss']:.3f}"
                                          for name, r in latest.items() if r))
            for name, (proc, handle) in list(active.items()):
                code, usage = _reap(proc)
                if code is None:
                    continue
                handle.close()
                del active[name]
                if usage is not None:  # ru_maxrss is in KiB on Linux
                    with atomic_write(runs[name].run_dir / RESOURCES_FILE) as out:
                        json.dump({"peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}, out)
                if code != 0:
                    failed.append((name, code))
    except KeyboardInterrupt:
        for proc, _ in active.values():
            proc.terminate()
        raise
    finally:
        bar.close()
    for name, code in failed:
        tail = last_line((runs[name].run_dir / "train.log").read_text(errors="replace"))
        raise UserError(f"training {name} failed (exit {code}): {tail}")
    summaries = {}
    for name, run in runs.items():
        summaries[name] = summary = json.loads((run.run_dir / "train_summary.json").read_text())
        log(f"      {labels.get(name, name)}: {summary['steps']} steps, {summary['samples']} samples in "
            f"{summary['train_seconds'] / 60:.1f} min ({summary['stop_reason']})")
    return summaries


def _start_training(config: Path, run: TrainRun, val_records: Path, minutes: float, max_steps: int | None):
    run.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [*command("train"), str(config), "--train_records", str(run.train_records),
           "--val_records", str(val_records), "--output_dir", str(run.run_dir),
           "--max_train_minutes", str(minutes), "--progress", "false", *run.extra]
    if max_steps:
        cmd += ["--max_steps", str(max_steps)]
    handle = open(run.run_dir / "train.log", "a", encoding="utf-8")
    return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT), handle


def merge_run(base_model: Path, run_dir: Path) -> Path:
    """merge_local_params.py: run_dir/final (trained parameters, or LoRA adapters) into
    run_dir/model, unless done."""
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        final = run_dir / "final"
        trained = ["--lora_path", str(final / "lora")] if (final / "lora").is_dir() else ["--local_path", str(final)]
        run_command([*command("merge"), "--model_name_or_path", str(base_model), *trained,
                     "--merge_model_path", str(model_dir)])
    return model_dir


def predict_concurrently(test_tsv: Path, run_dirs: list[Path], batch_size: int, max_new_tokens: int) -> float:
    """predict_batch.py with each run_dir/model into run_dir/results.txt, all at once, one thread
    each; returns the wall seconds."""
    procs = []
    for run_dir in run_dirs:
        results = run_dir / "results.txt"
        if results.is_file():
            continue
        cmd = [*command("predict"), str(test_tsv), str(results), str(run_dir / "model"),
               "--batch_size", str(batch_size), "--max_new_tokens", str(max_new_tokens), "--num_threads", "1",
               "--resume"]
        handle = open(run_dir / "predict.log", "w", encoding="utf-8")
        procs.append((run_dir, subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT), handle))
    t0 = time.time()
    for run_dir, proc, handle in procs:
        proc.wait()
        handle.close()
        if proc.returncode != 0:
            tail = last_line((run_dir / "predict.log").read_text(errors="replace"))
            raise UserError(f"predict_batch {run_dir.name} failed (exit {proc.returncode}): {tail}")
    return time.time() - t0


def evaluate_runs(run_dirs: dict, refs: Path, labels: dict | None = None) -> dict:
    """{name: {"label", "scores", "train", "peak_rss_mb", "predictions"}} of each
    run_dir/results.txt against refs."""
    from ..eval.evaluate import evaluate_files, read_results

    rows = {}
    for name, run_dir in run_dirs.items():
        scores = evaluate_files(run_dir / "results.txt", refs, fields=True)
        train = json.loads((run_dir / "train_summary.json").read_text())
        resources = run_dir / RESOURCES_FILE
        rows[name] = {"label": (labels or {}).get(name, name), "scores": scores,
                      "train": {k: train.get(k) for k in ("steps", "samples", "train_seconds", "trainable_parameters")},
                      "peak_rss_mb": json.loads(resources.read_text())["peak_rss_mb"] if resources.is_file() else None,
                      "predictions": read_results(run_dir / "results.txt")}
    return rows


def _last_record(path: Path, kind: str) -> dict | None:
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if record.get("kind") == kind:
            found = record
    return found
