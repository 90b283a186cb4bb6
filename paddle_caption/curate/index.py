"""Compact indexes for the deduplicators: numpy arrays, never a Python object per row.

At the contest's million rows a dict entry or a tuple per kept row costs ~100-200 bytes each and
several of them per op (the old index took ~3.7 KB of RSS per row); these structures take what
their arrays take:

- `Column`: a growable numpy array (amortised doubling), one fixed-size value per row;
- `Strings`: ids or captions as one UTF-8 byte buffer plus an offsets column;
- `BandIndex`: "which earlier rows share this key in band b?" for several bands (phash bands, MinHash
  LSH bands, an exact hash). Keys are uint64; each band holds sorted runs of (key, row) pairs,
  merged like a log-structured merge tree (a run is merged into the previous one while it is at
  least half its size), so inserting n rows costs O(n log n) and a lookup is a binary search per run.
  The newest rows (at most `buffer` of them) wait in a small dict so that a row sees every row before
  it, even one of the same batch.
"""
from __future__ import annotations

import hashlib

import numpy as np


def hash64(data: bytes) -> int:
    """A stable 64-bit key (blake2b): the same on every run and platform (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class Column:
    def __init__(self, dtype, width: int = 0):
        self.shape_tail = (width,) if width else ()
        self.data = np.zeros((1024,) + self.shape_tail, dtype=dtype)
        self.n = 0

    def append(self, value) -> int:
        if self.n == len(self.data):
            grown = np.zeros((2 * len(self.data),) + self.shape_tail, dtype=self.data.dtype)
            grown[:self.n] = self.data
            self.data = grown
        self.data[self.n] = value
        self.n += 1
        return self.n - 1

    def __getitem__(self, index):
        return self.data[:self.n][index]

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class Strings:
    def __init__(self):
        self.buffer = bytearray()
        self.ends = Column(np.uint64)

    def append(self, text: str) -> int:
        self.buffer += text.encode("utf-8")
        return self.ends.append(len(self.buffer))

    def __getitem__(self, i: int) -> str:
        start = int(self.ends[i - 1]) if i else 0
        return self.buffer[start:int(self.ends[i])].decode("utf-8")

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def nbytes(self) -> int:
        return len(self.buffer) + self.ends.nbytes


class BandIndex:
    def __init__(self, n_bands: int, buffer: int = 4096):
        self.n_bands, self.buffer_size = n_bands, buffer
        self.runs: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n_bands)]
        self.pending: list[dict[int, list[int]]] = [{} for _ in range(n_bands)]
        self.n_pending = 0

    def candidates(self, keys) -> np.ndarray:
        """The rows added so far that share at least one band's key with `keys` (one key per band),
        sorted, each once (int64)."""
        parts = []
        for band, key in enumerate(keys):
            pending = self.pending[band].get(key)
            if pending:
                parts.append(np.array(pending, dtype=np.uint32))
            k = np.uint64(key)
            for run_keys, run_rows in self.runs[band]:
                lo, hi = np.searchsorted(run_keys, k, "left"), np.searchsorted(run_keys, k, "right")
                if hi > lo:
                    parts.append(run_rows[lo:hi])
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.unique(np.concatenate(parts)).astype(np.int64)

    def add(self, keys, row: int) -> None:
        for band, key in enumerate(keys):
            self.pending[band].setdefault(key, []).append(row)
        self.n_pending += 1
        if self.n_pending >= self.buffer_size:
            self.flush()

    def flush(self) -> None:
        for band in range(self.n_bands):
            items = self.pending[band]
            if not items:
                continue
            keys = np.fromiter((k for k, rows in items.items() for _ in rows), dtype=np.uint64)
            rows = np.fromiter((r for rs in items.values() for r in rs), dtype=np.uint32)
            runs = self.runs[band]
            runs.append(_sorted(keys, rows))
            while len(runs) >= 2 and len(runs[-1][0]) * 2 >= len(runs[-2][0]):
                (k2, r2), (k1, r1) = runs.pop(), runs.pop()
                runs.append(_sorted(np.concatenate([k1, k2]), np.concatenate([r1, r2])))
            items.clear()
        self.n_pending = 0

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + r.nbytes for runs in self.runs for k, r in runs)


def _sorted(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    return keys[order], rows[order]


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits per element of a uint64 array (summed over the last axis by the caller)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)
