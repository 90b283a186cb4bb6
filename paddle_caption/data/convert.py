"""Clean a contest TSV into records.jsonl: python tools/convert_labels.py INPUT.tsv OUT_DIR [options]

Input rows are `id \\t base64-image \\t caption` (UTF-8, no header); the real file is ~1M rows and
~100 GB, which is the case this module is built for. It writes to OUT_DIR:
- `records.jsonl`: one JSON line per kept row, pointing into INPUT by byte offset; images are not
  copied (schema and reader: `paddle_caption.data.records`);
- `val_records.jsonl` with `--val-fraction F`: the kept rows whose sha1(id) falls below F;
- `rejects.tsv`: `line \\t id \\t reason` for every rejected row (1-based line; id may be empty);
- `summary.json`: counts per reason, caption-length statistics, the configuration, timing.

How: INPUT is cut into byte ranges (`--chunk-mb`); a process pool checks the ranges, each worker
reading its own range (image bytes never cross a pipe; `convert_ranges.py`), and the main process takes the results in
input order, so the output does not depend on `--workers`. At most 2 x workers ranges are in flight,
so memory stays flat whatever the input size. The main process drops duplicate ids and appends to
partial files; the final files appear (by rename) only when everything succeeded.

What is checked, and in which order, is the default recipe of curation's cleaning operations
(`clean_rules.py`: `CleanConfig`, `default_recipe`, `check_row`; the codes are `REJECT_REASONS`);
this module is the engine that applies it to a 100 GB file.

Resume: every `--checkpoint-seconds` the partial outputs are flushed and fsynced, then a state file
records the input offset reached, the line count, the partial files' sizes and the counters.
`--resume` truncates the partial files back to those sizes, rebuilds the seen-id set from the
partial records and continues from that offset, so the result equals an uninterrupted run's.

k-sigma (`--ksigma K`, the recipe's `caption_length_outlier_filter`): runs after the pass over
INPUT, on the rows kept so far. Their caption lengths (characters) are read back from the partial
records (megabytes, not the 100 GB input) into a `LengthHistogram`; rows outside mean +- K * std (population std) are rejected as
`caption_length_outlier`. Duplicate ids are decided before it.

Memory: besides the in-flight ranges, only the seen-id set grows (~100 B per id, ~100 MB for 1M
ids; `--no-dedup` drops it).

MUGE ECommerce-IC (`--captions IC_train.jsonl`): INPUT is then `IC_train.tsv` (`image_id \t base64`)
and each image's references come from the jsonl, held by the main process (the jsonl is text: ~100 B
per caption). The workers check the images; the main process checks each reference with the caption
rules and writes one record per kept reference (at most `--references-per-image`), all pointing at
the image's row and sharing its id (so a validation split keeps an image's references together).
An image with no entry in the jsonl is rejected as `no_reference`.
"""
from __future__ import annotations

import heapq
import itertools
import json
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import atomic_write, remove_stale_temps
from ..runtime import UserError, cpu_count
from .clean_rules import CleanConfig, build_recipe, check_caption, is_val
from .contest_tsv import read_muge_captions
from .convert_input import check_input, prepare_out_dir, sniff_utf8
from .convert_ranges import RangeResult, init_worker, process_range
from .distribution import LengthHistogram
from .records import dump_record
from .reject_reasons import REJECT_REASONS

RECORDS, VAL_RECORDS, REJECTS, SUMMARY = "records.jsonl", "val_records.jsonl", "rejects.tsv", "summary.json"
PART_RECORDS, PART_REJECTS, PART_OUTLIERS = ".records.partial", ".rejects.partial", ".outliers.partial"
STATE = ".convert_state.json"
STATE_VERSION = 1


@dataclass
class RunOptions:
    workers: int = 0  # 0: the core count
    chunk_bytes: int = 8 << 20
    checkpoint_seconds: float = 10.0
    resume: bool = False
    progress: bool = True


# --------------------------------------------------------------------------------- the run
class Conversion:
    """One conversion of `src` into `out_dir`; `run()` returns the summary dict."""

    def __init__(self, src, out_dir, cfg: CleanConfig, opts: RunOptions):
        cfg.validate()
        self.src, self.size = check_input(src)
        sniff_utf8(self.src)
        self.out = prepare_out_dir(out_dir)
        self.cfg, self.opts = cfg, opts
        self.workers = opts.workers or cpu_count()
        stat = self.src.stat()
        self.identity = {"version": STATE_VERSION, "input": str(self.src), "input_bytes": self.size,
                         "input_mtime_ns": stat.st_mtime_ns, "config": asdict(cfg)}
        self.captions = None  # MUGE layout: {image id: [references]}
        if cfg.captions:
            self.captions = read_muge_captions(cfg.captions)
            cap_stat = Path(cfg.captions).stat()
            self.identity["captions"] = [str(Path(cfg.captions).resolve()), cap_stat.st_size, cap_stat.st_mtime_ns]
        # Progress, restored from a checkpoint on --resume.
        self.offset = 0
        self.lines = 0
        self.kept = 0
        self.rejected: Counter = Counter()
        self.ops = build_recipe(cfg, self.out)  # the main process's: references, duplicate ids, k-sigma
        self.dedup = self.ops.get("duplicate_id_filter")
        self.resumed = False

    def path(self, name: str) -> Path:
        return self.out / name

    # ----------------------------------------------------------------------------- state
    def _open_partials(self):
        state_path = self.path(STATE)
        state = None
        if self.opts.resume:
            try:
                state = json.loads(state_path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                print(f"note: no interrupted run in {self.out}; starting from the beginning")
            except (OSError, ValueError) as err:
                raise UserError(f"--resume: cannot read {state_path}: {err}") from None
            if state is not None and state.get("identity") != self.identity:
                raise UserError(f"--resume: the input file or the cleaning options differ from the interrupted "
                                f"run's ({state_path}); rerun without --resume to start over")
        elif state_path.exists():
            print(f"note: discarding the interrupted run in {self.out} (use --resume to continue it)")
        if state is None:
            return open(self.path(PART_RECORDS), "wb"), open(self.path(PART_REJECTS), "wb")
        try:
            records = open(self.path(PART_RECORDS), "r+b")
            rejects = open(self.path(PART_REJECTS), "r+b")
        except FileNotFoundError as err:
            raise UserError(f"--resume: partial output {err.filename} is missing; rerun without --resume") from None
        # Anything written after the last checkpoint is dropped and will be recomputed.
        records.truncate(state["records_bytes"])
        rejects.truncate(state["rejects_bytes"])
        records.seek(0, os.SEEK_END)
        rejects.seek(0, os.SEEK_END)
        self.offset, self.lines, self.kept = state["offset"], state["lines"], state["kept"]
        self.rejected = Counter(state["rejected"])
        self.resumed = True
        if self.dedup is not None:
            with open(self.path(PART_RECORDS), "rb") as handle:
                for line in handle:
                    self.dedup.process({"id": json.loads(line.split(b"\t", 1)[1])["id"]})
        print(f"resuming at byte {self.offset:,} of {self.size:,} (line {self.lines:,}, {self.kept:,} kept so far)")
        return records, rejects

    def _checkpoint(self, records, rejects) -> None:
        for handle in (records, rejects):
            handle.flush()
            os.fsync(handle.fileno())
        state = {"identity": self.identity, "offset": self.offset, "lines": self.lines, "kept": self.kept,
                 "rejected": dict(self.rejected), "records_bytes": records.tell(), "rejects_bytes": rejects.tell()}
        with atomic_write(self.path(STATE)) as handle:
            json.dump(state, handle)

    # ----------------------------------------------------------------------------- main pass
    def _executor(self):
        """A process pool (None for one worker: ranges are then checked in this process)."""
        if self.workers == 1:
            init_worker(str(self.src), self.cfg, ignore_sigint=False)
            return None
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else methods[0])
        executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=init_worker,
                                       initargs=(str(self.src), self.cfg))
        executor.submit(int)  # with fork, the first submit forks every worker: do it while we are small
        return executor

    def _results(self, executor, ranges):
        """RangeResults in input order, with at most 2 x workers ranges in flight."""
        if executor is None:
            yield from map(process_range, ranges)
            return
        ranges = iter(ranges)
        pending = deque(executor.submit(process_range, r) for r in itertools.islice(ranges, 2 * self.workers))
        while pending:
            try:
                result = pending.popleft().result()
            except BrokenProcessPool:
                raise UserError("a worker process died (out of memory?); rerun with --resume to continue") from None
            following = next(ranges, None)
            if following is not None:
                pending.append(executor.submit(process_range, following))
            yield result

    def _merge(self, result: RangeResult, records, rejects) -> None:
        dups = []
        for index, rid, line in result.kept:
            reason = self.dedup.process({"id": rid}) if self.dedup is not None else None
            if reason:
                dups.append((index, rid, reason))
                continue
            lines = [line] if self.captions is None else self._references(index, rid, line, dups)
            for one in lines:
                records.write(f"{self.lines + index}\t{one}\n".encode("utf-8"))
                self.kept += 1
        for index, rid, reason in heapq.merge(result.rejects, dups):
            rejects.write(f"{self.lines + index}\t{rid}\t{reason}\n".encode("utf-8"))
            self.rejected[reason] += 1
        self.lines += result.lines
        self.offset = result.end

    def _references(self, index: int, rid: str, line: str, rejects: list) -> list[str]:
        """MUGE layout: the record lines of an image's references that pass the caption rules (at
        most references_per_image); rejected references are added to `rejects`."""
        refs = self.captions.get(rid)
        if not refs:
            rejects.append((index, rid, "no_reference"))
            return []
        record = json.loads(line)
        wanted = self.cfg.references_per_image or len(refs)
        out = []
        for caption in refs:
            if len(out) >= wanted:
                break
            reason = check_caption(caption, self.ops)
            if reason:
                rejects.append((index, rid, reason))
            else:
                out.append(dump_record({**record, "caption": caption}))
        return out

    def _main_pass(self) -> tuple[int, int]:
        from tqdm import tqdm

        with ExitStack() as stack:
            # The pool forks first: before the seen-id set exists and before tqdm starts a thread.
            executor = self._executor()
            if executor is not None:
                stack.callback(executor.shutdown, wait=True, cancel_futures=True)
            records, rejects = self._open_partials()
            stack.enter_context(records)
            stack.enter_context(rejects)
            start_offset, start_lines = self.offset, self.lines
            chunk = max(1, self.opts.chunk_bytes)
            ranges = [(s, min(s + chunk, self.size)) for s in range(self.offset, self.size, chunk)]
            bar = stack.enter_context(tqdm(total=self.size, initial=self.offset, unit="B", unit_scale=True,
                                           desc="convert", disable=not self.opts.progress, smoothing=0.05))
            t0 = last_checkpoint = time.perf_counter()
            for result in self._results(executor, ranges):
                before = self.offset
                self._merge(result, records, rejects)
                bar.update(self.offset - before)
                rate = (self.lines - start_lines) / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} rows/s, kept {self.kept:,}", refresh=False)
                if time.perf_counter() - last_checkpoint >= self.opts.checkpoint_seconds:
                    self._checkpoint(records, rejects)
                    last_checkpoint = time.perf_counter()
            self._checkpoint(records, rejects)  # a kill during finalisation resumes from here
        return self.offset - start_offset, self.lines - start_lines

    # ----------------------------------------------------------------------------- finalisation
    def _iter_partial_records(self):
        """(line number, records.jsonl line, record dict) from the partial records."""
        with open(self.path(PART_RECORDS), encoding="utf-8") as handle:
            for raw in handle:
                lineno, line = raw.rstrip("\n").split("\t", 1)
                yield int(lineno), line, json.loads(line)

    def _partial_samples(self):
        """(line number, records.jsonl line, the record as a sample) of the partial records."""
        for lineno, line, record in self._iter_partial_records():
            yield lineno, line, {**record, "stats": {}}

    def _finalize(self) -> dict:
        cfg = self.cfg
        outlier_filter = self.ops.get("caption_length_outlier_filter")
        bounds = None
        if outlier_filter is not None:
            def read():
                for _, _, sample in self._partial_samples():
                    outlier_filter.compute_stats(sample)
                    yield sample

            outlier_filter.prepare(read)
            lengths, bounds = outlier_filter.lengths, outlier_filter.bounds  # before the k-sigma filter
        else:
            lengths = LengthHistogram()  # caption lengths of the kept rows
        n_train = n_val = n_outliers = 0
        with ExitStack() as stack:
            train = stack.enter_context(atomic_write(self.path(RECORDS)))
            val = stack.enter_context(atomic_write(self.path(VAL_RECORDS))) if cfg.val_fraction > 0 else None
            outliers = stack.enter_context(open(self.path(PART_OUTLIERS), "w+", encoding="utf-8"))
            for lineno, line, record in self._partial_samples():
                if outlier_filter is None:
                    lengths.add(len(record["caption"]))
                else:
                    outlier_filter.compute_stats(record)
                    reason = outlier_filter.process(record)
                    if reason:
                        outliers.write(f"{lineno}\t{record['id']}\t{reason}\n")
                        n_outliers += 1
                        continue
                if val is not None and is_val(record["id"], cfg.val_fraction):
                    val.write(line + "\n")
                    n_val += 1
                else:
                    train.write(line + "\n")
                    n_train += 1
            # rejects.tsv: the main pass's rejects and the outliers, both in line order, merged.
            outliers.seek(0)
            with open(self.path(PART_REJECTS), encoding="utf-8") as main_rejects, \
                    atomic_write(self.path(REJECTS)) as out:
                for line in heapq.merge(main_rejects, outliers, key=lambda s: int(s.split("\t", 1)[0])):
                    out.write(line)
        if val is None and self.path(VAL_RECORDS).exists():
            self.path(VAL_RECORDS).unlink()  # a previous run's split no longer matches these records
        if n_outliers:
            self.rejected["caption_length_outlier"] += n_outliers
        files = {"records": str(self.path(RECORDS)), "rejects": str(self.path(REJECTS)),
                 "summary": str(self.path(SUMMARY))}
        if val is not None:
            files["val_records"] = str(self.path(VAL_RECORDS))
        return {
            "kept_train": n_train,
            "kept_val": n_val,
            "caption_chars": lengths.summary(),
            "ksigma": None if bounds is None else {"k": cfg.ksigma, "low": round(bounds[0], 3),
                                                   "high": round(bounds[1], 3)},
            "files": files,
        }

    def run(self) -> dict:
        t0 = time.perf_counter()
        try:
            bytes_done, lines_done = self._main_pass()
            final = self._finalize()
        except OSError as err:
            raise UserError(f"I/O error: {err.filename or ''} {err.strerror or err}".strip()) from None
        seconds = time.perf_counter() - t0
        rejected = {r: self.rejected[r] for r in REJECT_REASONS if self.rejected[r]}
        summary = {
            "input": str(self.src),
            "input_bytes": self.size,
            "rows_read": self.lines,
            "kept": final["kept_train"] + final["kept_val"],
            "kept_train": final["kept_train"],
            "kept_val": final["kept_val"],
            "rejected": sum(rejected.values()),
            "rejected_by_reason": rejected,
            "caption_chars": final["caption_chars"],
            "ksigma": final["ksigma"],
            "files": final["files"],
            "config": asdict(self.cfg),
            "run": {"workers": self.workers, "resumed": self.resumed, "seconds": round(seconds, 3),
                    "mb_per_s": round(bytes_done / 1e6 / max(seconds, 1e-9), 1),
                    "rows_per_s": round(lines_done / max(seconds, 1e-9), 1)},
        }
        with atomic_write(self.path(SUMMARY)) as handle:
            json.dump(summary, handle, ensure_ascii=False, indent=2)
        for name in (PART_RECORDS, PART_REJECTS, PART_OUTLIERS, STATE):
            self.path(name).unlink(missing_ok=True)
        for name in (STATE, RECORDS, VAL_RECORDS, REJECTS, SUMMARY):  # left by a SIGKILLed run
            remove_stale_temps(self.path(name))
        return summary


def convert(src, out_dir, cfg: CleanConfig | None = None, opts: RunOptions | None = None) -> dict:
    """Convert `src` (contest TSV) into `out_dir`; returns the summary (also written as summary.json)."""
    return Conversion(src, out_dir, cfg or CleanConfig(), opts or RunOptions()).run()
