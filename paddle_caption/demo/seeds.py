"""Scores over training seeds: the mean and sample standard deviation of each arm of a demo (the
curation demo's raw and curated runs), so that a gain can be set against run-to-run noise."""
from __future__ import annotations

import statistics

from .pipeline import markdown_table, score_value

FIELD_KEYS = ("background", "style", "colour", "shape", "exact")
SEED_KEYS = ("CIDEr-D", "BLEU-4", "ROUGE-L") + FIELD_KEYS


def seed_summary(arms: dict[str, list[dict]]) -> dict:
    """Per arm and score: the values over the training seeds, their mean and sample std (0 for one)."""
    out = {}
    for arm, rows in arms.items():
        out[arm] = {}
        for key in SEED_KEYS:
            values = [score_value(r["scores"], key) for r in rows]
            out[arm][key] = {"values": values, "mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def seed_table(seeds: dict, n: int, labels: dict[str, str]) -> str:
    fmt = lambda key, v: f"{v:.3f}" if key in ("CIDEr-D", "BLEU-4", "ROUGE-L") else f"{v:.1%}"  # noqa: E731
    lines = [[f"{labels[arm]}, mean ± std over {n} seeds"] + [f"{fmt(k, s[k]['mean'])} ± {fmt(k, s[k]['std'])}"
                                                            for k in SEED_KEYS] for arm, s in seeds.items()]
    return markdown_table(["model"] + list(SEED_KEYS), lines)
