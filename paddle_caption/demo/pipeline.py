"""The one-command demo: synthetic ads -> convert -> train (images vs no images) -> merge -> predict -> score.

    python tools/run_demo.py --config config/demo.json --out checkpoints/demo

Every stage is one of the user-facing commands (tools/make_demo_data.py, tools/convert_labels.py,
supervised_finetune.py, tools/merge_local_params.py, predict_batch.py) run exactly as a user would
run it, so the demo proves the workflow rather than a private shortcut. The image model and the
no-image ablation train at the same time, one Paddle thread each: on this tiny model one thread
is faster per sample than two, so two concurrent runs cost the wall time of one.

Stages whose outputs already exist are skipped (training resumes from its last checkpoint), so an
interrupted demo continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import atomic_write
from ..runtime import UserError

RUNS = {"image": "with images", "no_image": "no-image ablation"}
BARS = {"cider_ratio": 3.0, "background": 0.95, "style": 0.60}


@dataclass
class DemoOptions:
    config: Path
    out: Path
    n_train: int = 4000
    n_val: int = 200
    n_test: int = 200
    data_seed: int = 0
    minutes: float | None = None  # overrides the config's max_train_minutes
    max_steps: int | None = None  # overrides the config's max_steps (the slow test uses a few)
    ablation: bool = True
    batch_size: int = 16
    max_new_tokens: int = 128
    show: int = 6  # test captions printed
    grid: int = 16  # test images drawn in the PNG


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


# ---- stages, shared with the curation demo (paddle_caption/demo/curate_demo.py) ---------------------------
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


class Demo:
    """The pipeline's stages over a set of training runs of one config (`runs`: run name -> extra
    `--key value` training arguments; `labels`: run name -> its row name in tables). The demo
    trains the image model and the no-image ablation side by side (`concurrent_runs` = 2);
    `compare_modes.py` reuses every stage for full / partial / LoRA, one run at a time."""

    name = "demo"
    labels = RUNS
    concurrent_runs = 2
    curve_title = "tiny Mgen-VL on the synthetic ad world"

    def __init__(self, opts: DemoOptions, log=print):
        self.opts, self.log = opts, log
        self.out = Path(opts.out)
        from ..train.config import TrainConfig

        self.train_config = TrainConfig.load(opts.config)  # checked before anything slow starts
        self.runs = {"image": ["--ablate_images", "false"]}
        if opts.ablation:
            self.runs["no_image"] = ["--ablate_images", "true"]

    def label(self, run: str) -> str:
        return self.labels.get(run, run)

    # ---- stages ----------------------------------------------------------------------------------
    def make_data(self):
        o = self.opts
        made = make_data(self.out, {"train": o.n_train, "val": o.n_val, "test": o.n_test}, o.data_seed)
        self.log(f"[1/6] synthetic ad world: {o.n_train} train / {o.n_val} val / {o.n_test} test images"
                 + ("" if made else f": {self.out / 'data'} exists, kept"))

    def convert(self):
        for split in ("train", "val"):
            convert_split(self.out / "data" / f"{split}.tsv", self.out / split)
        summary = json.loads((self.out / "train" / "summary.json").read_text())
        reasons = ", ".join(f"{k} {v}" for k, v in summary["rejected_by_reason"].items())
        self.log(f"[2/6] convert_labels: kept {summary['kept']} training rows, rejected "
                 f"{summary['rejected']} ({reasons}); ledger {self.out / 'train' / 'rejects.tsv'}")

    def train(self):
        cfg = self.train_config
        minutes = self.opts.minutes if self.opts.minutes is not None else cfg.max_train_minutes
        runs = {run: TrainRun(self.out / run, self.out / "train" / "records.jsonl", extra)
                for run, extra in self.runs.items()}
        how = "concurrently" if self.concurrent_runs > 1 else "one after another"
        self.log(f"[3/6] training {' and '.join(self.label(r) for r in self.runs)} {how}, "
                 f"{minutes:g} min budget each (logs: {self.out}/<run>/train.log)")
        train_runs(self.opts.config, runs, self.out / "val" / "records.jsonl", minutes, self.opts.max_steps,
                   self.log, labels=self.labels, concurrent=self.concurrent_runs)

    def merge(self):
        for run in self.runs:
            merge_run(self._base_model(), self.out / run)
        self.log("[4/6] merged trained parameters into full model directories: "
                 + ", ".join(str(self.out / run / "model") for run in self.runs))

    def _base_model(self) -> Path:
        from ..train.config import resolve_path

        cfg = self.train_config
        return Path(resolve_path(cfg.model_name_or_path or cfg.model_config))

    def predict(self):
        """The models caption the test split at once, one thread each, as in training."""
        seconds = predict_concurrently(self.out / "data" / "test.tsv", [self.out / run for run in self.runs],
                                       self.opts.batch_size, self.opts.max_new_tokens)
        self.log(f"[5/6] predict_batch.py on {self.opts.n_test} test images: {seconds:.0f} s "
                 f"(max_new_tokens {self.opts.max_new_tokens}, batch {self.opts.batch_size})")

    def evaluate(self) -> dict:
        return evaluate_runs({run: self.out / run for run in self.runs}, self.out / "data" / "test_refs.tsv",
                             {run: self.label(run) for run in self.runs})

    # ---- the report ------------------------------------------------------------------------------
    def report(self, rows: dict) -> dict:
        from ..eval.evaluate import read_references

        refs = read_references(self.out / "data" / "test_refs.tsv")
        table = results_table(rows)
        self.log("\n[6/6] test split (" + f"{self.opts.n_test} images, jieba tokens)\n" + table)
        checks = bar_checks(rows)
        for line in checks["lines"]:
            self.log("  " + line)
        self.log("\nsample test captions:")
        ids = list(refs)[: self.opts.show]
        for image_id in ids:
            self.log(f"  {image_id}\n    reference : {refs[image_id][0]}")
            for run in self.runs:
                self.log(f"    {self.label(run):<10}: {rows[run]['predictions'][image_id]}")
        grid_warning = self.write_grid(rows["image"]["predictions"], refs)
        curve = self.write_curve()
        result = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.opts).items()},
                  "runs": {run: {"scores": rows[run]["scores"], "train": rows[run]["train"]} for run in self.runs},
                  "bar": checks["bar"], "table": table,
                  "files": {"caption_grid": str(self.out / "caption_grid.png"), "learning_curve": str(curve)}}
        with atomic_write(self.out / "results.json") as handle:
            json.dump(result, handle, indent=2, ensure_ascii=False)
        with atomic_write(self.out / "results.md") as handle:
            handle.write(table + "\n\n" + "\n".join(checks["lines"]) + "\n")
        self.log(f"\nwrote {self.out / 'results.md'}, {self.out / 'results.json'}, "
                 f"{self.out / 'caption_grid.png'}, {curve}")
        if grid_warning:
            self.log(f"note: {grid_warning}")
        return result

    def write_grid(self, predictions: dict, refs: dict) -> str | None:
        from ..data.contest_tsv import RowError, iter_rows
        from ..data.images import ImageRejected, b64decode_strict, decode_image
        from .plots import caption_grid_png

        items = []
        for _, _, row in iter_rows(self.out / "data" / "test.tsv", test=True):
            if len(items) >= self.opts.grid:
                break
            if isinstance(row, RowError):
                continue
            try:
                image = decode_image(b64decode_strict(row.image_b64))
            except ImageRejected:  # a bad test image is drawn as an empty cell, like predict's empty caption
                image = None
            items.append({"id": row.id, "image": image, "prediction": predictions.get(row.id, ""),
                          "reference": refs.get(row.id, [""])[0]})
        return caption_grid_png(items, self.out / "caption_grid.png", columns=4,
                                title="paddle_caption demo: predicted (top) vs reference (bottom)")

    def write_curve(self) -> Path:
        from .plots import learning_curve_png

        runs = {}
        for run in self.runs:
            path = self.out / run / "log.jsonl"
            runs[self.label(run)] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return learning_curve_png(runs, self.out / "learning_curve.png", title=self.curve_title)

    def run(self) -> dict:
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.make_data()
        self.convert()
        self.train()
        self.merge()
        self.predict()
        result = self.report(self.evaluate())
        self.log(f"{self.name} finished in {(time.time() - t0) / 60:.1f} min")
        return result


# ---- table and bar, pure functions of the scores (tested) ------------------------------------------
COLUMNS = [("CIDEr-D", "CIDEr-D", "{:.3f}"), ("BLEU-4", "BLEU-4", "{:.3f}"), ("ROUGE-L", "ROUGE-L", "{:.3f}"),
           ("background", "background", "{:.0%}"), ("style", "style", "{:.0%}"),
           ("colour", "colour", "{:.0%}"), ("shape", "shape", "{:.0%}"), ("exact", "exact", "{:.0%}")]


def _value(scores: dict, key: str):
    return scores[key] if key in scores else scores.get("fields", {}).get(key)


def results_table(rows: dict) -> str:
    header = ["model"] + [title for title, _, _ in COLUMNS] + ["steps", "train min"]
    lines = []
    for run, row in rows.items():
        cells = [row.get("label", RUNS.get(run, run))]
        for _, key, fmt in COLUMNS:
            value = _value(row["scores"], key)
            cells.append("n/a" if value is None else fmt.format(value))
        cells += [str(row["train"]["steps"]), f"{row['train']['train_seconds'] / 60:.1f}"]
        lines.append(cells)
    return markdown_table(header, lines)


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    """A Markdown table with aligned columns."""
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(c) for c in lines])


def bar_checks(rows: dict) -> dict:
    """The demo's bar: CIDEr-D >= 3x the ablation's, background >= 95%, style >= 60%."""
    image = rows["image"]["scores"]
    bar, lines = {}, []
    if "no_image" in rows:
        ablation = rows["no_image"]["scores"]["CIDEr-D"]
        ratio = image["CIDEr-D"] / ablation if ablation > 0 else float("inf")
        bar["cider_ratio"] = {"value": ratio, "target": BARS["cider_ratio"], "pass": ratio >= BARS["cider_ratio"]}
    for key in ("background", "style"):
        value = _value(image, key) or 0.0
        bar[key] = {"value": value, "target": BARS[key], "pass": value >= BARS[key]}
    for key, check in bar.items():
        shown = f"{check['value']:.2f}x" if key == "cider_ratio" else f"{check['value']:.0%}"
        target = f"{check['target']:g}x" if key == "cider_ratio" else f"{check['target']:.0%}"
        name = "CIDEr-D image / no-image" if key == "cider_ratio" else f"{key} accuracy"
        lines.append(f"{'PASS' if check['pass'] else 'MISS'}  {name}: {shown} (bar {target})")
    return {"bar": bar, "lines": lines}


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/demo.json", help="training config (TrainConfig JSON)")
    parser.add_argument("--out", default="checkpoints/demo", help="output directory")
    parser.add_argument("--train", type=int, default=4000, help="synthetic training images")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, help="training budget per model (default: the config's)")
    parser.add_argument("--max-steps", type=int, help="stop training after N steps (for quick checks)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the no-image ablation")
    parser.add_argument("--batch-size", type=int, default=16, help="prediction batch size")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    opts = DemoOptions(config=Path(args.config), out=Path(args.out), n_train=args.train, n_val=args.val,
                       n_test=args.test, data_seed=args.data_seed, minutes=args.minutes,
                       max_steps=args.max_steps, ablation=not args.no_ablation, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens)
    Demo(opts).run()
    return 0
