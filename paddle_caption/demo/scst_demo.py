"""Train for the metric: the demo model + more cross-entropy vs the demo model + SCST (`make scst-demo`).

    python tools/run_scst_demo.py --demo checkpoints/demo --out checkpoints/scst_demo --minutes 5

Stages chained by config: stage 1 is `make demo` (config/demo.json: cross-entropy from scratch,
merged into checkpoints/demo/image/model); stage 2 is config/scst_demo.json, a TrainConfig whose
`model_name_or_path` is stage 1's model and whose `objective` is "scst". The comparison trains,
from that same start, on the same data and budget:

- (a) `--objective cross_entropy` (the demo's own loss, continued);
- (b) the config as shipped (SCST: k sampled captions per image, CIDEr-D reward, mean baseline);

for each seed (default 1 and 2), (a) and (b) of one seed at the same time, one thread each (as the
demo trains its two runs), then merges, captions the demo's test split greedily with
`predict_batch.py` and scores: CIDEr-D, BLEU-4, ROUGE-L, the synthetic fields, caption length
(jieba words), the degenerate share (eval/degenerate.py) and steps. The bar: (b)'s mean CIDEr-D
>= 1.08 x (a)'s, field accuracies no worse, degenerate share no higher; the per-seed rows show the
spread. Every stage is a user-facing command (demo/stages.py); finished stages are skipped.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..files import atomic_write
from ..runtime import UserError
from .pipeline import Demo, DemoOptions, markdown_table, score_value
from .stages import evaluate_runs, predict_concurrently, train_runs, TrainRun

BAR = {"cider_gain": 0.08}
FIELDS = ("background", "style", "colour", "shape", "exact")


@dataclass
class SCSTDemoOptions:
    demo: Path = Path("checkpoints/demo")  # `make demo`'s output: data, converted splits, image model
    out: Path = Path("checkpoints/scst_demo")
    config: Path = Path("config/scst_demo.json")
    minutes: float = 5.0
    seeds: tuple = (1, 2)
    ce_batch_size: int = 8  # (a) trains with the demo's batch; SCST's batch is the config's
    max_steps: int | None = None
    batch_size: int = 16  # prediction
    max_new_tokens: int = 128


class SCSTDemo(Demo):
    name = "scst-demo"
    concurrent_runs = 2
    curve_title = "demo model + cross-entropy vs + SCST"

    def __init__(self, opts: SCSTDemoOptions, log=print):
        self.scst_opts = opts
        super().__init__(DemoOptions(config=opts.config, out=opts.out, minutes=opts.minutes, ablation=False,
                                     max_steps=opts.max_steps, batch_size=opts.batch_size,
                                     max_new_tokens=opts.max_new_tokens), log)
        self.demo_dir = Path(opts.demo)
        if self.train_config.objective != "scst":
            raise UserError(f"{opts.config}: objective must be \"scst\" (it is the stage (b) trains)")
        # stage 1's model in --demo (the config names make demo's default place for it)
        self.start = self.demo_dir / "image" / "model"
        if not (self.start / "config.json").is_file():
            raise UserError(f"{self.start}: no demo model (stage 1): run 'make demo' first (about 15 minutes)")
        self.runs, self.labels = {}, {}
        for seed in opts.seeds:
            common = ["--model_name_or_path", str(self.start), "--seed", str(seed)]
            self.runs[f"ce_seed{seed}"] = [*common, "--objective", "cross_entropy",
                                           "--per_device_train_batch_size", str(opts.ce_batch_size)]
            self.runs[f"scst_seed{seed}"] = common
            self.labels[f"ce_seed{seed}"] = f"(a) + cross-entropy, seed {seed}"
            self.labels[f"scst_seed{seed}"] = f"(b) + SCST, seed {seed}"

    def _base_model(self) -> Path:
        return self.start

    def make_data(self):
        self.log(f"[1/6] data and stage 1 (the demo model): {self.demo_dir} (make demo)")

    def convert(self):
        for split in ("train", "val"):
            if not (self.demo_dir / split / "records.jsonl").is_file():
                raise UserError(f"{self.demo_dir / split / 'records.jsonl'}: missing; run 'make demo' first")
        self.log(f"[2/6] converted splits: {self.demo_dir}/train, {self.demo_dir}/val")

    def train(self):
        o = self.scst_opts
        runs = {run: TrainRun(self.out / run, self.demo_dir / "train" / "records.jsonl", extra)
                for run, extra in self.runs.items()}
        self.log(f"[3/6] from {self._base_model()}: {len(runs)} runs of {o.minutes:g} min, two at a time "
                 f"(logs: {self.out}/<run>/train.log)")
        train_runs(self.opts.config, runs, self.demo_dir / "val" / "records.jsonl", o.minutes, o.max_steps,
                   self.log, labels=self.labels, concurrent=self.concurrent_runs)

    def predict(self):
        seconds = predict_concurrently(self.demo_dir / "data" / "test.tsv", [self.out / run for run in self.runs],
                                       self.opts.batch_size, self.opts.max_new_tokens)
        self.log(f"[5/6] predict_batch.py on the demo's test split: {seconds:.0f} s")

    def evaluate(self) -> dict:
        refs = self.demo_dir / "data" / "test_refs.tsv"
        rows = evaluate_runs({"start": self.demo_dir / "image"}, refs, {"start": "demo model (start)"})
        rows.update(evaluate_runs({run: self.out / run for run in self.runs}, refs, self.labels))
        return rows

    def report(self, rows: dict) -> dict:
        for row in rows.values():
            row["scores"].update(caption_stats(row["predictions"]))
        groups = {"ce": [rows[r] for r in self.runs if r.startswith("ce_")],
                  "scst": [rows[r] for r in self.runs if r.startswith("scst_")]}
        table = scst_table(rows, groups)
        checks = bar_checks(groups)
        self.log(f"\n[6/6] demo test split, greedy, {self.scst_opts.minutes:g} min per run\n" + table)
        for line in checks["lines"]:
            self.log("  " + line)
        result = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.scst_opts).items()},
                  "runs": {run: {"label": row["label"], "scores": row["scores"], "train": row["train"]}
                           for run, row in rows.items()},
                  "bar": checks["bar"], "table": table}
        with atomic_write(self.out / "results.json") as handle:
            json.dump(result, handle, indent=2, ensure_ascii=False)
        with atomic_write(self.out / "results.md") as handle:
            handle.write(table + "\n\n" + "\n".join(checks["lines"]) + "\n")
        curve = self.write_curve()
        self.log(f"\nwrote {self.out / 'results.md'}, {self.out / 'results.json'}, {curve}")
        return result


# ---- statistics, table and bar: pure functions of the scores (tested) ------------------------------
def caption_stats(predictions: dict) -> dict:
    """Mean caption length in jieba words and the degenerate share of a predictions dict."""
    from ..eval.caption_scores import tokenize
    from ..eval.degenerate import degenerate_share

    captions = list(predictions.values())
    return {"words": statistics.fmean(len(tokenize(c)) for c in captions) if captions else 0.0,
            "degenerate": degenerate_share(captions)}


COLUMNS = [("CIDEr-D", "{:.3f}"), ("BLEU-4", "{:.3f}"), ("ROUGE-L", "{:.3f}")] + \
          [(f, "{:.1%}") for f in FIELDS] + [("words", "{:.1f}"), ("degenerate", "{:.1%}")]


def mean_and_spread(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean over the rows and the spread (max - min) of one score."""
    values = [score_value(r["scores"], key) for r in rows]
    values = [v for v in values if v is not None]
    return (statistics.fmean(values), max(values) - min(values)) if values else (float("nan"), 0.0)


def scst_table(rows: dict, groups: dict) -> str:
    header = ["model"] + [k for k, _ in COLUMNS] + ["steps"]
    lines = []
    for row in rows.values():
        cells = [row["label"]]
        for key, fmt in COLUMNS:
            value = score_value(row["scores"], key)
            cells.append("n/a" if value is None else fmt.format(value))
        lines.append(cells + [str(row["train"]["steps"])])
    for name, label in (("ce", "(a) cross-entropy, mean (spread)"), ("scst", "(b) SCST, mean (spread)")):
        if not groups.get(name):
            continue
        cells = [label]
        for key, fmt in COLUMNS:
            mean, spread = mean_and_spread(groups[name], key)
            cells.append(f"{fmt.format(mean)} ({fmt.format(spread)})")  # spread: max - min over seeds
        steps = [r["train"]["steps"] for r in groups[name]]
        lines.append(cells + [f"{statistics.fmean(steps):.0f}"])
    return markdown_table(header, lines)


def bar_checks(groups: dict) -> dict:
    """(b) vs (a), on the means over seeds: CIDEr-D >= +8%, every field no worse, degenerate no higher."""
    a, b = groups["ce"], groups["scst"]
    cider_a, spread_a = mean_and_spread(a, "CIDEr-D")
    cider_b, spread_b = mean_and_spread(b, "CIDEr-D")
    gain = cider_b / cider_a - 1 if cider_a > 0 else float("inf")
    bar = {"cider_gain": {"value": gain, "target": BAR["cider_gain"], "pass": gain >= BAR["cider_gain"]}}
    worse = [f for f in FIELDS if mean_and_spread(b, f)[0] < mean_and_spread(a, f)[0]]
    bar["fields_no_worse"] = {"value": worse, "pass": not worse}
    deg_a, deg_b = mean_and_spread(a, "degenerate")[0], mean_and_spread(b, "degenerate")[0]
    bar["degenerate_no_higher"] = {"value": [deg_a, deg_b], "pass": deg_b <= deg_a}
    mark = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    lines = [f"{mark(bar['cider_gain']['pass'])}  CIDEr-D (b) vs (a): {gain:+.1%} (bar +8%); "
             f"(a) {cider_a:.3f} spread {spread_a:.3f}, (b) {cider_b:.3f} spread {spread_b:.3f}",
             f"{mark(not worse)}  field accuracies no worse" + (f": worse on {', '.join(worse)}" if worse else ""),
             f"{mark(deg_b <= deg_a)}  degenerate share: (a) {deg_a:.1%}, (b) {deg_b:.1%}"]
    return {"bar": bar, "lines": lines}
