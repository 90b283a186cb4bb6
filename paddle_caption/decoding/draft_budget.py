"""How many draft tokens a decode step should feed: never more than they pay for.

A verify step feeds each greedy row its own token plus d drafted ones, so its forward is d+1 tokens
wide. On a GPU the extra width is nearly free at small batches; on a CPU the forward (and the output
layer, which runs for every fed token) grows with the width, so at batch 16 drafting can make
decoding slower than plain batched greedy (measured 0.95x with retrieval drafts, docs/benchmarks.md).

`DraftBudget` keeps a cost model of the step per batch-size bucket, measured on this machine while
decoding: t(w) = t1 + slope * (w - 1) for a forward w tokens wide (`t1` from plain steps, `slope`
from verify steps, each an exponential moving average). For each step it picks the width w that
maximises the expected tokens per second,

    sum over rows of (1 + expected accepted tokens of the row's draft cut to w - 1) / t(w),

where a draft's expected accepted tokens are the running products of its per-token probabilities
(`Draft.cumulative`), scaled by how well those estimates have matched what was really accepted
(`calibration`). w = 1 means a plain step: drafting is switched off for as long as it does not pay,
and re-tried every `retry_every` plain steps so the model follows the machine's load. Until a bucket
has both measurements, it takes one plain step and one full-width step to get them.

The choice changes only which drafted tokens are fed, never the output (the scheduler verifies
every fed token against plain greedy decoding).
"""
from __future__ import annotations

import numpy as np

EMA = 0.2  # weight of the newest measurement


class _Bucket:
    def __init__(self):
        self.t1 = None  # seconds of a plain step
        self.slope = None  # seconds per extra token of width
        self.plain_since_try = 0


class DraftBudget:
    def __init__(self, retry_every: int = 32):
        self.retry_every = int(retry_every)
        self.buckets: dict[int, _Bucket] = {}
        self.calibration = 1.0  # accepted / expected, EMA over verify steps
        self.decisions = {"plain": 0, "draft": 0}

    @staticmethod
    def _key(rows: int) -> int:
        return 1 << max(0, int(rows) - 1).bit_length()  # 1, 2, 4, 8, ...

    def choose(self, drafts: list) -> int:
        """The number of draft tokens per row to feed this step (0: a plain step), for `drafts`
        (one `Draft` per cache row; empty for rows that do not draft)."""
        longest = max((len(d) for d in drafts), default=0)
        if longest == 0:
            return 0
        bucket = self.buckets.setdefault(self._key(len(drafts)), _Bucket())
        if bucket.t1 is None:
            return self._decide(0)
        if bucket.slope is None:
            return self._decide(longest)
        expected = np.zeros(longest + 1)
        for draft in drafts:
            if len(draft):
                gains = np.cumsum(draft.cumulative) * self.calibration
                expected[1:len(draft) + 1] += gains
                expected[len(draft) + 1:] += gains[-1]
        widths = np.arange(longest + 1)
        rate = (len(drafts) + expected) / (bucket.t1 + bucket.slope * widths)
        best = int(np.argmax(rate))
        if best == 0:
            bucket.plain_since_try += 1
            if bucket.plain_since_try >= self.retry_every:  # look again: the load may have changed
                bucket.plain_since_try = 0
                best = int(np.argmax(rate[1:])) + 1
        return self._decide(best)

    def _decide(self, width: int) -> int:
        self.decisions["draft" if width else "plain"] += 1
        return width

    def record(self, rows: int, width: int, seconds: float, expected: float = 0.0, accepted: int = 0) -> None:
        """A step of `rows` cache rows, `width` draft tokens wide (0: plain), took `seconds`; with
        drafts, `expected` accepted tokens were predicted and `accepted` happened."""
        bucket = self.buckets.setdefault(self._key(rows), _Bucket())
        if width == 0:
            bucket.t1 = seconds if bucket.t1 is None else (1 - EMA) * bucket.t1 + EMA * seconds
            return
        if bucket.t1 is not None:
            slope = max(0.0, (seconds - bucket.t1) / width)
            bucket.slope = slope if bucket.slope is None else (1 - EMA) * bucket.slope + EMA * slope
        if expected > 0:
            ratio = min(4.0, max(0.05, accepted / expected))
            self.calibration = (1 - EMA) * self.calibration + EMA * ratio

    def summary(self) -> dict:
        return {"plain_steps": self.decisions["plain"], "draft_steps": self.decisions["draft"],
                "calibration": round(self.calibration, 3),
                "cost_ms": {str(k): {"plain": None if b.t1 is None else round(1000 * b.t1, 3),
                                     "per_draft_token": None if b.slope is None else round(1000 * b.slope, 3)}
                            for k, b in sorted(self.buckets.items())}}
