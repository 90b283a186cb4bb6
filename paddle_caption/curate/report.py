"""The curation report: report.md, and PNG plots drawn with matplotlib.

- `funnel.png`: rows in and out of every stage, dropped rows by stage;
- `before_after.png`: caption length (characters, jieba words) and image width/height, input vs
  output, as overlaid histograms;
- `scores_NN_<op>.png`: for every op deciding on a number, that statistic's histogram over the op's
  input, kept and dropped rows stacked, with the resolved thresholds as lines.

Everything is read back streaming from the stage files; histograms hold their bins, not the rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.distribution import LengthHistogram
from ..files import atomic_write
from ..fonts import matplotlib_cjk_family
from ..text import jieba_words
from .samples import iter_samples

BINS = 50


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _sizes(path: Path) -> dict[str, LengthHistogram]:
    hists = {key: LengthHistogram() for key in ("chars", "words", "width", "height")}
    for sample in iter_samples(path):
        if sample.get("copy", 0):
            continue  # a repeat is not another image
        caption = sample["caption"]
        hists["chars"].add(len(caption))
        hists["words"].add(len(jieba_words(caption)))
        hists["width"].add(sample["width"])
        hists["height"].add(sample["height"])
    return hists


def _overlay(ax, before: LengthHistogram, after: LengthHistogram, title: str) -> None:
    values = sorted(set(before.counts) | set(after.counts))
    if values:
        lo, hi = values[0], values[-1]
        edges = np.linspace(lo, hi + 1, min(BINS, hi - lo + 1) + 1)
        for hist, label, colour in ((before, "before", "#bbbbbb"), (after, "after", "#4477aa")):
            xs = sorted(hist.counts)
            ax.hist(xs, bins=edges, weights=[hist.counts[x] for x in xs], label=f"{label} ({hist.n})",
                    color=colour, alpha=0.7 if label == "after" else 1.0)
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_ylabel("rows")


def _stat_values(stage_dir: Path, stat: str):
    """(kept values, dropped values) of `stat` among the stage's original rows (copies skipped)."""
    kept = [s["stats"][stat] for s in iter_samples(stage_dir / "kept.jsonl")
            if not s.get("copy", 0) and isinstance(s["stats"].get(stat), (int, float))]
    dropped = []
    with open(stage_dir / "dropped.jsonl", encoding="utf-8") as handle:
        for line in handle:
            value = json.loads(line)["stats"].get(stat)
            if isinstance(value, (int, float)):
                dropped.append(value)
    return np.asarray(kept, dtype=np.float64), np.asarray(dropped, dtype=np.float64)


def _threshold_lines(done: dict, stat: str) -> list[tuple[str, float]]:
    info = done.get("info") or {}
    lines = []
    bounds = (info.get("bounds") or {}).get(stat)
    if bounds:
        for side in ("min", "max"):
            if bounds.get(f"{side}_value") is not None:
                lines.append((f"{side} {bounds[side]} = {bounds[f'{side}_value']:.3g}", bounds[f"{side}_value"]))
    for key in ("min_value", "threshold", "recaption_below_value"):
        if info.get(key) is not None:
            lines.append((f"{key} = {info[key]:.3g}", info[key]))
    return lines


def write_report(run, summary: dict) -> dict:
    plt = _pyplot()
    family = matplotlib_cjk_family()
    rc = {"font.family": "sans-serif", "font.sans-serif": [family, "DejaVu Sans"]} if family else {}
    out = run.out
    files = {}
    stages = summary["stages"]
    with plt.rc_context(rc):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(stages) + 2), 4))
        names = ["input"] + [f"{k}. {s['op']}" for k, s in enumerate(stages, 1)]
        rows = [summary["input_rows"]] + [s["kept"] for s in stages]
        ax.bar(range(len(rows)), rows, color="#4477aa", label="rows after the stage")
        ax.bar(range(1, len(rows)), [s["dropped"] for s in stages], bottom=rows[1:], color="#cc6677",
               label="dropped by the stage")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
        ax.set_ylabel("rows")
        ax.set_title("Curation: rows per stage")
        ax.legend(fontsize=8)
        files["funnel"] = _save(plt, fig, out / "funnel.png")

        before, after = _sizes(run.input_dir() / "samples.jsonl"), _sizes(out / "records.jsonl")
        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        for ax, key, title in zip(axes.flat, ("chars", "words", "width", "height"),
                                  ("caption length (characters)", "caption length (jieba words)",
                                   "image width (px)", "image height (px)")):
            _overlay(ax, before[key], after[key], title)
        fig.suptitle("Before and after curation (repeats counted once)")
        fig.tight_layout()
        files["before_after"] = _save(plt, fig, out / "before_after.png")

        for k, done in enumerate(stages, 1):
            stat = done.get("stat")
            if not stat:
                continue
            kept, dropped = _stat_values(run.stage_dir(k), stat)
            if not len(kept) + len(dropped):
                continue
            lo = min(kept.min(initial=np.inf), dropped.min(initial=np.inf))
            hi = max(kept.max(initial=-np.inf), dropped.max(initial=-np.inf))
            edges = np.linspace(lo, hi if hi > lo else lo + 1, BINS + 1)
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.hist([kept, dropped], bins=edges, stacked=True, color=["#4477aa", "#cc6677"],
                    label=[f"kept ({len(kept)})", f"dropped ({len(dropped)})"])
            for label, x in _threshold_lines(done, stat):
                ax.axvline(x, color="#222222", linestyle="--", linewidth=1)
                ax.text(x, ax.get_ylim()[1] * 0.95, f" {label}", fontsize=8, va="top")
            ax.set_title(f"stage {k}: {done['op']} — {stat}")
            ax.set_xlabel(stat)
            ax.set_ylabel("rows")
            ax.legend(fontsize=8)
            files[f"scores_{k}"] = _save(plt, fig, out / f"scores_{k:02d}_{done['op']}.png")

    files["report"] = out / "report.md"
    with atomic_write(files["report"]) as handle:
        handle.write(report_markdown(summary, before, after, files))
    return {k: str(v) for k, v in files.items()}


def report_markdown(summary: dict, before: dict, after: dict, files: dict) -> str:
    lines = ["# Curation report", "",
             f"Input: `{summary['recipe']['dataset']}`, {summary['input_rows']} rows. Output: "
             f"{summary['output']['rows']} rows ({summary['output']['synthetic']} synthetic) in "
             f"`{summary['output']['files']['records']}`; every dropped row is in "
             f"`{summary['output']['files']['ledger']}`. Stage time {summary['stage_seconds']:.1f} s.", "",
             "| # | op | in | kept | dropped | reasons | thresholds | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for k, s in enumerate(summary["stages"], 1):
        reasons = ", ".join(f"{r} {n}" for r, n in s["dropped_by_reason"].items()) or "-"
        info = s.get("info") or {}
        bounds = info.get("bounds") or {}
        thresholds = "; ".join(
            f"{stat} " + " ".join(f"{side} {b[side]}={b[side + '_value']:.4g}" for side in ("min", "max")
                                  if b.get(side + "_value") is not None)
            for stat, b in bounds.items()) or ", ".join(
            f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in info.items() if key in ("min_value", "threshold", "quota", "target", "clusters")
            and value is not None) or info.get("rule") or "-"
        seconds = s["seconds"]["stats"] + s["seconds"]["decide"]
        lines.append(f"| {k} | {s['op']} | {s['input']} | {s['kept']}" + (f" (+{s['copies']} copies)" if s["copies"] else "")
                     + f" | {s['dropped']} | {reasons} | {thresholds} | {seconds:.1f} |")
    lines += ["", "| | rows | caption chars (mean) | jieba words (mean) | width (mean) | height (mean) |",
              "|---|---|---|---|---|---|"]
    for name, h in (("before", before), ("after (repeats once)", after)):
        lines.append(f"| {name} | {h['chars'].n} | {h['chars'].mean():.1f} | {h['words'].mean():.1f} | "
                     f"{h['width'].mean():.0f} | {h['height'].mean():.0f} |")
    lines += ["", "Plots: " + ", ".join(f"`{Path(p).name}`" for k, p in files.items() if k != "report"), ""]
    return "\n".join(lines)
