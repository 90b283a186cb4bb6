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

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import atomic_write
from .stages import TrainRun, convert_split, evaluate_runs, make_data, merge_run, predict_concurrently, train_runs

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


def score_value(scores: dict, key: str):
    """A score of evaluate_files' result by name: a metric (CIDEr-D, ...) or a field accuracy."""
    return scores[key] if key in scores else (scores.get("fields") or {}).get(key)


def results_table(rows: dict) -> str:
    header = ["model"] + [title for title, _, _ in COLUMNS] + ["steps", "train min"]
    lines = []
    for run, row in rows.items():
        cells = [row.get("label", RUNS.get(run, run))]
        for _, key, fmt in COLUMNS:
            value = score_value(row["scores"], key)
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
        value = score_value(image, key) or 0.0
        bar[key] = {"value": value, "target": BARS[key], "pass": value >= BARS[key]}
    for key, check in bar.items():
        shown = f"{check['value']:.2f}x" if key == "cider_ratio" else f"{check['value']:.0%}"
        target = f"{check['target']:g}x" if key == "cider_ratio" else f"{check['target']:.0%}"
        name = "CIDEr-D image / no-image" if key == "cider_ratio" else f"{key} accuracy"
        lines.append(f"{'PASS' if check['pass'] else 'MISS'}  {name}: {shown} (bar {target})")
    return {"bar": bar, "lines": lines}
