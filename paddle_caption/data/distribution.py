"""Statistics of a column of numbers, streamed: the one module that computes them for analysis
(`stats.py`), conversion (the k-sigma filter) and curation (bounds computed on the data).

- `LengthHistogram`: integer lengths (caption characters, words, tokens, image sides) counted in a
  histogram: exact mean, population std and percentiles in memory O(distinct values);
- `moments` and `exact_quantiles`: any numbers, read as often as needed from a fresh iterator:
  mean and std from running sums (Welford), quantiles exactly by a histogram pass that finds the bin
  holding the wanted rank and a pass that collects only that bin's values.

Both take percentiles by the same nearest-rank rule (`nearest_rank`).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

PERCENTILES = (50, 90, 95, 99, 100)  # what a length summary reports
HISTOGRAM_BINS = 1 << 14


def nearest_rank(q: float, n: int) -> int:
    """The 1-based rank of the q-th percentile of n values: the smallest value with at least q% of
    the values <= it."""
    return max(1, math.ceil(q / 100 * n))


class LengthHistogram:
    """Exact statistics of integer lengths from their histogram: memory O(distinct lengths)."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, length: int, times: int = 1) -> None:
        self.counts[int(length)] += times

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def mean(self) -> float:
        n = self.n
        return sum(v * c for v, c in self.counts.items()) / n if n else 0.0

    def std(self) -> float:
        """Population standard deviation (ddof=0)."""
        n = self.n
        if not n:
            return 0.0
        mean = self.mean()
        return math.sqrt(sum(c * (v - mean) ** 2 for v, c in self.counts.items()) / n)

    def percentile(self, q: float) -> int:
        """Nearest-rank percentile: the smallest length with at least q% of the samples <= it."""
        n = self.n
        if not n:
            return 0
        rank = nearest_rank(q, n)
        seen = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= rank:
                return value
        return max(self.counts)

    def fraction_at_most(self, limit: int) -> float:
        n = self.n
        return sum(c for v, c in self.counts.items() if v <= limit) / n if n else 0.0

    def ksigma_bounds(self, k: float) -> tuple[float, float]:
        mean, std = self.mean(), self.std()
        return mean - k * std, mean + k * std

    def summary(self) -> dict:
        out = {"n": self.n, "mean": round(self.mean(), 3), "std": round(self.std(), 3),
               "min": min(self.counts, default=0)}
        out.update({f"p{q}" if q < 100 else "max": self.percentile(q) for q in PERCENTILES})
        return out


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
    `LengthHistogram.percentile`) of the values `read()` yields, each call a fresh pass."""
    stats = stats or moments(read())
    if stats.n == 0:
        raise ValueError("no values")
    if stats.low == stats.high:
        return [stats.low for _ in qs]
    ranks = [nearest_rank(q, stats.n) for q in qs]
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
