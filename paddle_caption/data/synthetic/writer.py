"""Rendering the rows of a split in a process pool, and writing the dataset's TSV files."""
from __future__ import annotations

import base64
import math
import multiprocessing as mp
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from ...files import atomic_write
from ...runtime import UserError, cpu_count
from .render import encode_jpeg, render_ad
from .rows import (DIRTY_KINDS, NOISE_KINDS, SPLITS, NoiseConfig, SyntheticRow, make_dirty, make_noisy,
                   plan_dirty_rows, plan_noise_rows, row_id)
from .world import format_caption, sample_fields


def _render_rows(job: tuple[str, int, list[tuple]]) -> list[SyntheticRow]:
    """Worker: render the rows (index, id, dirty kind, (noise kind, donor) or None) of one chunk."""
    split, seed, items = job
    rows = []
    for index, rid, dirty, noise in items:
        rng = np.random.default_rng([seed, SPLITS[split], index])
        fields = sample_fields(rng)
        jpeg = encode_jpeg(render_ad(fields, rng))
        row = SyntheticRow(rid, base64.b64encode(jpeg).decode("ascii"), format_caption(fields), dirty)
        if dirty:
            make_dirty(row, jpeg, rng)
        elif noise:
            row.noise = noise[0]
            make_noisy(row, fields, np.random.default_rng([seed, SPLITS[split], index, 7]), seed, noise[1])
        rows.append(row)
    return rows


def _pool(workers: int):
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else methods[0]).Pool(workers)


def generate_split(split: str, n: int, seed: int, *, workers: int = 1, pool=None,
                   noise: NoiseConfig | None = None) -> Iterator[SyntheticRow]:
    """Yield the `n` rows of `split` in order; dirty and noisy rows only in "train".

    Rows are rendered in chunks by `pool` (or by a pool of `workers` processes made here); the result
    does not depend on either.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    dirty = plan_dirty_rows(seed, n) if split == "train" else {}
    noisy = plan_noise_rows(seed, n, dirty, noise) if split == "train" and noise is not None else {}
    ids: list[str] = []
    for i in range(n):
        # A duplicated-id row reuses the id of the row just before it.
        ids.append(ids[i - 1] if dirty.get(i) == "duplicate_id" else row_id(split, i))
    items = [(i, ids[i], dirty.get(i), noisy.get(i)) for i in range(n)]
    chunk = max(1, min(32, math.ceil(n / 8)))  # small enough to keep two workers busy on small splits
    jobs = [(split, seed, items[i:i + chunk]) for i in range(0, n, chunk)]

    if pool is None and (workers <= 1 or len(jobs) <= 1):
        for job in jobs:
            yield from _render_rows(job)
        return
    own = pool is None
    pool = _pool(workers) if own else pool
    try:
        for rows in pool.imap(_render_rows, jobs):
            yield from rows
    finally:
        if own:
            pool.terminate()
            pool.join()


def write_dataset(out_dir: str | Path, n_train: int, n_val: int, n_test: int, seed: int,
                  workers: int | None = None, progress: bool = True, noise: NoiseConfig | None = None) -> dict:
    """Write train.tsv, val.tsv, test.tsv and test_refs.tsv (each atomically); return a summary.

    With `noise`, also train_noise.tsv (`id \t kind \t truth` of every noisy training row) and, if
    it asks for an unlabeled pool, unlabeled.tsv and unlabeled_refs.tsv.
    """
    from contextlib import ExitStack

    from tqdm import tqdm

    for name, value in (("--train", n_train), ("--val", n_val), ("--test", n_test)):
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    workers = cpu_count() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")
    names = ["train", "val", "test", "test_refs"]
    if noise is not None:
        noise.validate()
        names.append("train_noise")
        if noise.unlabeled:
            names += ["unlabeled", "unlabeled_refs"]
    files = {name: out_dir / f"{name}.tsv" for name in names}
    n_unlabeled = noise.unlabeled if noise is not None else 0

    start = time.perf_counter()
    dirty_counts = Counter({kind: 0 for kind in DIRTY_KINDS})
    noise_counts = Counter({kind: 0 for kind in NOISE_KINDS}) if noise is not None else Counter()
    total = n_train + n_val + n_test + n_unlabeled
    pool = _pool(workers) if workers > 1 and total > 1 else None
    try:
        with ExitStack() as stack, tqdm(total=total, desc="synthetic ads", unit="img", disable=not progress) as bar:
            out = {name: stack.enter_context(atomic_write(path)) for name, path in files.items()}
            for split, n in (("train", n_train), ("val", n_val), ("test", n_test), ("unlabeled", n_unlabeled)):
                for row in generate_split(split, n, seed, pool=pool, noise=noise):
                    if split in ("test", "unlabeled"):
                        out[split].write(f"{row.id}\t{row.image_b64}\n")
                        out[f"{split}_refs"].write(f"{row.id}\t{row.caption}\n")
                    else:
                        out[split].write(row.line() + "\n")
                    if row.dirty:
                        dirty_counts[row.dirty] += 1
                    if row.noise:
                        noise_counts[row.noise] += 1
                        out["train_noise"].write(f"{row.id}\t{row.noise}\t{row.noise_detail}\n")
                    bar.update(1)
    except OSError as err:
        raise UserError(f"cannot write {err.filename or out_dir}: {err.strerror or err}") from None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    n_dirty = sum(dirty_counts.values())
    summary = {
        "out_dir": str(out_dir),
        "files": {name: str(path) for name, path in files.items()},
        "seed": seed,
        "counts": {"train": n_train, "val": n_val, "test": n_test},
        "train_clean": n_train - n_dirty,
        "train_dirty": n_dirty,
        "dirty": dict(dirty_counts),
        "workers": workers,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if noise is not None:
        summary["counts"]["unlabeled"] = n_unlabeled
        summary["noise"] = dict(noise_counts)
        summary["train_clean"] -= sum(noise_counts.values())
    return summary
