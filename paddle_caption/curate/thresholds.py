"""Bounds for a statistic, fixed or computed on the data itself, and exact streaming quantiles.

A bound in a recipe is one of
- a number: fixed (`"min": 12`);
- `{"percentile": q}`: the nearest-rank q-th percentile of the statistic over the op's input;
- `{"mean_std": k}`: mean + k * std (population std; k may be negative: `{"mean_std": -1}`);
- `"mean"`: the mean (`"min": "mean"` drops every row below the mean, the Better Synth cut).

Computed bounds read the statistic from the stage's stats file, streamed: mean and std from running
sums; quantiles exactly, by a histogram pass that finds the bin holding the wanted rank and a pass
that collects only that bin's values. Memory is the histogram, whatever the number of rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..runtime import UserError

HISTOGRAM_BINS = 1 << 14


@dataclass
class Moments:
    n: int = 0
    mean: float = 0.0
    std: float = 0.0
    low: float = math.inf
    high: float = -math.inf


def moments(values: Iterable[float]) -> Moments:
    """Count, mean, population std, min and max in one pass (Welford)."""
    n, mean, m2, low, high = 0, 0.0, 0.0, math.inf, -math.inf
    for value in values:
        n += 1
        delta = value - mean
        mean += delta / n
        m2 += delta * (value - mean)
        low, high = min(low, value), max(high, value)
    return Moments(n, mean, math.sqrt(m2 / n) if n else 0.0, low, high)


def exact_quantiles(read: Callable[[], Iterable[float]], qs: list[float], stats: Moments | None = None) -> list[float]:
    """Nearest-rank quantiles (the smallest value with at least q% of the values <= it, as
    `stats.LengthHistogram.percentile`) of the values `read()` yields, each call a fresh pass."""
    stats = stats or moments(read())
    if stats.n == 0:
        raise ValueError("no values")
    if stats.low == stats.high:
        return [stats.low for _ in qs]
    ranks = [max(1, math.ceil(q / 100 * stats.n)) for q in qs]
    width = (stats.high - stats.low) / HISTOGRAM_BINS

    def bin_of(value: float) -> int:
        return min(HISTOGRAM_BINS - 1, int((value - stats.low) / width))

    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for value in read():
        counts[bin_of(value)] += 1
    cumulative = np.cumsum(counts)
    wanted = {}  # bin -> rank within the bin, per requested rank
    targets = []
    for rank in ranks:
        b = int(np.searchsorted(cumulative, rank))
        before = int(cumulative[b - 1]) if b else 0
        targets.append((b, rank - before))
        wanted.setdefault(b, [])
    for value in read():
        b = bin_of(value)
        if b in wanted:
            wanted[b].append(value)
    for values in wanted.values():
        values.sort()
    return [wanted[b][k - 1] for b, k in targets]


BOUND_HELP = 'a number, {"percentile": q}, {"mean_std": k} or "mean"'


def check_bound(value, where: str) -> None:
    """A recipe bound's form (see the module docstring), or a UserError naming `where`."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)) or value == "mean":
        return
    if isinstance(value, dict) and len(value) == 1:
        (kind, arg), = value.items()
        if kind in ("percentile", "mean_std") and isinstance(arg, (int, float)) and not isinstance(arg, bool):
            if kind == "percentile" and not 0 <= arg <= 100:
                raise UserError(f"{where}: percentile must be in [0, 100], got {arg}")
            return
    raise UserError(f"{where}: a bound is {BOUND_HELP}, not {value!r}")


def needs_data(value) -> bool:
    return value is not None and not isinstance(value, (int, float))


def resolve_bound(value, read: Callable[[], Iterable[float]], stats: Moments) -> float | None:
    """A recipe bound as a number, computed on the values `read()` yields where it asks to be."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    if stats.n == 0:
        return None
    if value == "mean":
        return stats.mean
    (kind, arg), = value.items()
    if kind == "mean_std":
        return stats.mean + arg * stats.std
    return float(exact_quantiles(read, [arg], stats)[0])


def describe_bound(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if value == "mean":
        return "mean"
    (kind, arg), = value.items()
    return f"p{arg:g}" if kind == "percentile" else f"mean{arg:+g}std"
