"""The draft datastore: a suffix array over caption token ids (as REST), what retrieval drafting
reads (`drafting.RetrievalDrafter`).

The datastore is every caption of a captions file (the training records by default), tokenised,
each followed by `<|im_end|>` (what the model is trained to emit last) and preceded by a start
marker, concatenated into one int32 array `tokens`; `suffix_array` lists every position of it
sorted by the `depth` tokens that follow (a suffix array cut at that depth: positions equal that far
keep their order). A token pattern's occurrences are then one contiguous range of the suffix array,
found by binary search, and because the range is sorted by what follows the pattern, the most
frequent continuation is the longest run of equal tokens in it, found again by binary search.

On disk (a directory, written atomically): `tokens.npy`, `suffix_array.npy` (int32, memory-mapped
on load: a datastore of 1M captions loads in milliseconds and pages in what lookups touch) and
`datastore.json` (format, depth, counts, source). `tools/merge_local_params.py` builds one into the
model directory from the run's training records (`draft_datastore/`).
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from ..data.records import iter_captions
from ..files import iter_text_lines, write_json
from ..runtime import UserError

DATASTORE_DIR = "draft_datastore"
FORMAT = "paddle_caption.draft_datastore/1"
START = -1  # marks the beginning of every caption (and of every row's text when matching)
END = -2  # after the last caption, `depth` times: every read `tokens[p + d]` (d <= depth) is in range
DEFAULT_DEPTH = 64
_EXACT = 1024  # ranges up to this width are scanned whole
_SAMPLE = 256  # wider ones find their most frequent continuation among this many evenly spaced entries


def suffix_array(tokens: np.ndarray, depth: int) -> np.ndarray:
    """Positions of `tokens` sorted by the (up to) `depth` tokens starting there (prefix doubling:
    one argsort per doubling of the compared length, so log2(depth) sorts). Past the end of the
    array counts as smaller than every token."""
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    _, rank = np.unique(tokens, return_inverse=True)
    rank = rank.astype(np.int64) + 1  # 0 is reserved for "past the end"
    order = np.argsort(rank, kind="stable")
    width = 1  # `rank` orders suffixes by their first `width` tokens
    while width < depth and rank.max() < n:  # all distinct: longer prefixes change nothing
        following = np.zeros(n, dtype=np.int64)
        following[:n - width] = rank[width:]
        key = rank * (n + 1) + following
        order = np.argsort(key, kind="stable")
        ordered = key[order]
        fresh = np.empty(n, dtype=np.bool_)
        fresh[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=fresh[1:])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.cumsum(fresh)
        width *= 2
    return order.astype(np.int32)


class DraftDatastore:
    """Caption token ids and their suffix array (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, suffix: np.ndarray, depth: int, info: dict | None = None):
        self.tokens, self.suffix, self.depth = tokens, suffix, int(depth)
        self.info = dict(info or {})
        self.size = len(suffix)  # real positions (the END tail is not in the suffix array)

    # ---- building, saving, loading ----------------------------------------------------------------
    @classmethod
    def build(cls, sequences: Iterable, depth: int = DEFAULT_DEPTH, **info) -> "DraftDatastore":
        """From token id sequences (each one caption, its stop id included)."""
        if depth < 2:
            raise ValueError("depth must be >= 2")
        parts, count = [], 0
        for seq in sequences:
            seq = np.asarray(seq, dtype=np.int64)
            if len(seq) == 0:
                continue
            if seq.min() < 0 or seq.max() >= 2 ** 31:
                raise ValueError("token ids must be in [0, 2**31)")
            parts.append(np.concatenate([[START], seq]))
            count += 1
        body = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)
        start = time.perf_counter()
        suffix = suffix_array(body, depth)
        tokens = np.concatenate([body, np.full(depth + 1, END, dtype=np.int32)])
        info.update(captions=count, tokens=int(len(body)), build_seconds=round(time.perf_counter() - start, 3))
        return cls(tokens, suffix, depth, info)

    @classmethod
    def from_captions(cls, captions: Iterable[str], tokenizer, depth: int = DEFAULT_DEPTH,
                      **info) -> "DraftDatastore":
        """Each caption as the model is trained to write it: its BPE ids, then `<|im_end|>`."""
        stop = tokenizer.im_end_id
        return cls.build((ids + [stop] for ids in tokenizer.encode_batch(list(captions))), depth, **info)

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer, depth: int = DEFAULT_DEPTH) -> "DraftDatastore":
        """From a captions file: `.jsonl` lines with a "caption" (records.jsonl), else one caption
        per line of text."""
        return cls.from_captions(read_captions(path), tokenizer, depth, source=str(Path(path).resolve()))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the directory atomically (temp directory + rename)."""
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "tokens.npy", np.ascontiguousarray(self.tokens, dtype=np.int32))
        np.save(tmp / "suffix_array.npy", np.ascontiguousarray(self.suffix, dtype=np.int32))
        write_json(tmp / "datastore.json", {"format": FORMAT, "depth": self.depth, **self.info})
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DraftDatastore":
        directory = Path(directory)
        meta_path = directory / "datastore.json"
        if not meta_path.is_file():
            raise UserError(f"{directory}: not a draft datastore (no datastore.json)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{meta_path}: unreadable ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{meta_path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                            f"expected {FORMAT!r}")
        try:  # mapped, not read; plain ndarray views index faster than np.memmap's Python __getitem__
            tokens = np.load(directory / "tokens.npy", mmap_mode="r").view(np.ndarray)
            suffix = np.load(directory / "suffix_array.npy", mmap_mode="r").view(np.ndarray)
        except (OSError, ValueError) as err:
            raise UserError(f"{directory}: cannot read the datastore arrays ({err})") from None
        depth = meta.pop("depth", None)
        meta.pop("format")
        if (tokens.dtype != np.int32 or suffix.dtype != np.int32 or not isinstance(depth, int)
                or len(tokens) != len(suffix) + depth + 1):
            raise UserError(f"{directory}: tokens.npy and suffix_array.npy do not match datastore.json")
        return cls(tokens, suffix, depth, meta)

    # ---- lookups ----------------------------------------------------------------------------------
    def _at(self, offset: int):
        """key(i) = the token `offset` places into the suffix at suffix-array index i."""
        tokens, suffix = self.tokens, self.suffix
        return lambda i: tokens[suffix[i] + offset]

    def narrow(self, lo: int, hi: int, offset: int, token: int) -> tuple[int, int]:
        """Within [lo, hi) (suffixes equal in their first `offset` tokens), the sub-range whose
        token at `offset` is `token` (empty: lo == hi)."""
        if hi - lo <= _EXACT:
            values = self.tokens[self.suffix[lo:hi] + offset]
            return lo + int(np.searchsorted(values, token, "left")), lo + int(np.searchsorted(values, token, "right"))
        key = self._at(offset)
        first = bisect.bisect_left(range(self.size), token, lo, hi, key=key)
        return first, bisect.bisect_right(range(self.size), token, first, hi, key=key)

    def find(self, pattern) -> tuple[int, int]:
        """The suffix-array range of `pattern`'s occurrences (len(pattern) <= depth)."""
        lo, hi = 0, self.size
        for offset, token in enumerate(pattern):
            lo, hi = self.narrow(lo, hi, offset, int(token))
            if lo == hi:
                break
        return lo, hi

    def most_frequent(self, lo: int, hi: int, offset: int) -> tuple[int, int, int]:
        """(token, lo, hi): the most frequent token at `offset` in [lo, hi) and its sub-range. Wide
        ranges pick it from an even sample (a draft needs a likely token, not a census)."""
        if hi - lo <= _EXACT:
            values = self.tokens[self.suffix[lo:hi] + offset]
        else:
            values = self.tokens[self.suffix[lo + (np.arange(_SAMPLE) * (hi - lo)) // _SAMPLE] + offset]
        bounds = np.flatnonzero(np.diff(values)) + 1
        starts = np.concatenate([[0], bounds])
        lengths = np.diff(np.concatenate([starts, [len(values)]]))
        token = int(values[starts[int(np.argmax(lengths))]])
        return (token, *self.narrow(lo, hi, offset, token))


def read_captions(path: str | os.PathLike) -> list[str]:
    """The captions of a JSON-lines file (records.jsonl, curated samples, a caption export: read by
    `data.records.iter_captions`) or of a text file (one caption per line); blank lines are skipped."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return list(iter_captions(path))
    return [where_line[1].strip() for where_line in iter_text_lines(path, "captions file")]


def load_datastore(model_dir: str | os.PathLike | None, tokenizer, source: str | os.PathLike | None = None,
                   log=None) -> DraftDatastore:
    """`source` (a datastore directory, or a captions file to build one from in memory), else
    MODEL_DIR/draft_datastore."""
    if source is not None:
        path = Path(source)
        if path.is_dir():
            return DraftDatastore.load(path)
        if not path.is_file():
            raise UserError(f"draft source {path}: no such file or directory")
        store = DraftDatastore.from_file(path, tokenizer)
        if log is not None:
            log(f"built a draft datastore from {path}: {store.info['captions']} captions, "
                f"{store.info['tokens']} tokens in {store.info['build_seconds']:.1f} s")
        return store
    path = Path(model_dir or ".") / DATASTORE_DIR
    if not path.is_dir():
        raise UserError(f"{model_dir} has no {DATASTORE_DIR}/ (tools/merge_local_params.py builds it from "
                        "the training records): pass a captions file or datastore as the draft source")
    return DraftDatastore.load(path)
