"""Run a recipe: stages, the ledger, resume, the training-ready outputs.

EXPORT_DIR/work/ holds one directory per stage, named by its position, op and a fingerprint of
everything that decides it (the dataset file, the recipe up to that op, the model directories):

    00_input_<fp>/samples.jsonl                the dataset as samples
    NN_<op>_<fp>/stats.jsonl                   the input with this op's statistics (compute_stats)
    NN_<op>_<fp>/kept.jsonl, dropped.jsonl     the decision (process / select)
    NN_<op>_<fp>/done.json                     counts, reasons, resolved thresholds, seconds

A stage whose done.json exists is not run again, so an interrupted run resumes at the stage it was
in (and a model stage within its shards: `compute_shard`, `paddle_caption.shards`); changing an op's parameters reruns it and
every stage after it. Then EXPORT_DIR gets `records.jsonl` (what supervised_finetune.py reads;
pseudo-labels marked `"synthetic": true`), `ledger.jsonl` (every dropped row: stage, op, id,
reason, score, caption, stats), `summary.json`, the report (`report.py`) and, if asked,
`curated.tsv` and a data-juicer export.

Several processes (`paddle.distributed.launch`): every rank computes its share of a model stage's
statistics (and of a `shardable` op's: the deduplicators' decode and hashes); rank 0 alone reads the dataset, decides, and writes everything else; the other ranks
wait for each stage's done.json.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

from ..data.records import dump_record
from ..files import atomic_write, remove_stale_temps_under, write_json
from ..runtime import UserError
from ..shards import (ShardWriter, file_signature, fingerprint, merge_round_robin, read_shard, shard_path, share,
                      share_size, wait_for_file)
from .ops import OpContext, build_op
from .recipe import Recipe
from .samples import count_samples, dump_sample, iter_record_samples, iter_samples, write_samples
from .scoring import ModelCache

MERGE_TIMEOUT = 24 * 3600.0


def compute_shard(items: Iterator[dict], compute_batch: Callable[[list[dict]], None], output: Path, fingerprint: str,
                  rank: int, world: int, batch_size: int, *, progress: bool = True, total: int | None = None,
                  desc: str = "stats") -> int:
    """Compute this rank's share of `items` in batches into its shard of `output`
    (`paddle_caption.shards`), after what the shard already holds; returns the share's count."""
    from tqdm import tqdm

    path = shard_path(output, rank, world)
    state = read_shard(path)
    if state.fingerprint != fingerprint:
        state = None  # no shard yet, or another stage's: start over
    elif state.complete:
        return state.count
    count = state.count if state else 0
    mine = islice(share(items, rank, world), count, None)  # resume: skip what the shard holds
    with ShardWriter(path, fingerprint, state) as writer, \
            tqdm(total=None if total is None else share_size(total, rank, world), initial=count, unit="row",
                 disable=not progress, dynamic_ncols=True,
                 desc=desc if world == 1 else f"{desc} rank {rank}/{world}") as bar:
        while True:
            batch = list(islice(mine, batch_size))
            if not batch:
                break
            compute_batch(batch)
            writer.add(batch)
            count += len(batch)
            bar.update(len(batch))
        writer.finish(count)
    return count


def _model_signature(model_dir: str) -> str:
    from ..predict.predictor import model_dir_signature

    path = Path(model_dir)
    return model_dir_signature(path) if path.is_dir() else model_dir


class CurationRun:
    def __init__(self, recipe: Recipe, *, rank: int = 0, world_size: int = 1, progress: bool = True, log=print):
        self.recipe, self.rank, self.world, self.progress = recipe, rank, world_size, progress
        self.log = log if rank == 0 else (lambda *a, **k: None)
        self.out = Path(recipe.export_dir)
        self.work = self.out / "work"
        self.models = ModelCache(recipe.num_threads or None, recipe.engine)
        self.entries = [self._with_model_dir(entry) for entry in recipe.process]
        # every op is built (and its parameters checked) before anything runs
        self.ops = [build_op(entry, OpContext(work_dir=self.work), f"process[{i}]")
                    for i, entry in enumerate(self.entries)]
        for op in self.ops:
            op.plan(self.ops)

    def _with_model_dir(self, entry):
        if isinstance(entry, dict) and len(entry) == 1:
            (name, params), = entry.items()
            if isinstance(params, dict) and "model_dir" not in params and self._takes_model_dir(name):
                return {name: {**params, "model_dir": self.recipe.model_dir}}
        return entry

    @staticmethod
    def _takes_model_dir(name: str) -> bool:
        from ..typed_config import field_types
        from .ops import OPS

        return name in OPS and "model_dir" in field_types(OPS[name].Params)

    # ---- stages ------------------------------------------------------------------------------------
    def input_dir(self) -> Path:
        return self.work / f"00_input_{self._fingerprint(0)}"

    def input_stage(self) -> Path:
        path = self.input_dir() / "samples.jsonl"
        done = path.with_name("done.json")
        if self.rank != 0:
            wait_for_file(done, MERGE_TIMEOUT, what="rank 0 to read the dataset")
            return path
        if done.is_file():
            return path
        if self.recipe.dataset_format == "data_juicer":
            from .formats import import_data_juicer

            samples = import_data_juicer(self.recipe.dataset, self.input_dir())
        else:
            samples = iter_record_samples(self.recipe.dataset)
        n = write_samples(path, samples)
        write_json(done, {"fingerprint": self._fingerprint(0), "rows": n})
        return path

    def _fingerprint(self, k: int) -> str:
        """What decides stage k: the dataset file, the recipe up to op k, the model directories' files."""
        params = [next(iter(entry.values())) or {} for entry in self.entries[:k]]
        parts = {"dataset": file_signature(self.recipe.dataset), "format": self.recipe.dataset_format,
                 "process": self.entries[:k], "seed": self.recipe.seed,
                 "models": sorted({_model_signature(p["model_dir"]) for p in params if "model_dir" in p})}
        return fingerprint(parts, length=12)

    def stage_dir(self, k: int) -> Path:
        return self.work / f"{k:02d}_{self.ops[k - 1].name}_{self._fingerprint(k)}"

    def run_stage(self, k: int, source: Path) -> Path:
        op = self.ops[k - 1]
        stage = self.stage_dir(k)
        done = stage / "done.json"
        kept = stage / "kept.jsonl"
        if done.is_file():
            return kept
        stage.mkdir(parents=True, exist_ok=True)
        op.ctx = OpContext(work_dir=stage, stage_input=source, rank=self.rank, world_size=self.world,
                           batch_size=self.recipe.batch_size, seed=self.recipe.seed, progress=self.progress,
                           models=self.models)
        stats_path = stage / "stats.jsonl"
        t0, cpu0 = time.perf_counter(), time.process_time()
        # Model ops and the dedup ops' decode-and-hash go through shard files even in one process: a
        # killed run resumes inside the stage (at a million rows a dedup stage's hashes are ~15 minutes).
        sharded = op.uses_model or op.shardable
        if sharded and not stats_path.is_file():  # (a resumed run may find it merged already)
            total = None
            if self.progress:
                total = (sum(1 for _ in op.input_samples(iter_samples(source))) if op.uses_model
                         else count_samples(source))
            # a shard batch is fsynced: a model batch is slow anyway, hashes are ~1 ms a row
            batch_size = self.recipe.batch_size if op.uses_model else max(self.recipe.batch_size, 1024)
            # The stage directory's name holds its fingerprint: a shard of other settings is not resumed.
            compute_shard(op.input_samples(iter_samples(source)), op.compute_stats_batch, stats_path, stage.name,
                          self.rank, self.world, batch_size, progress=self.progress, total=total,
                          desc=f"[{k}] {op.name}")
            if self.rank == 0:
                merge_round_robin(stats_path, self.world, stage.name, MERGE_TIMEOUT)
        elif self.rank == 0 and not stats_path.is_file():
            write_samples(stats_path, self._compute(op, source, k))
        if self.rank != 0:
            wait_for_file(done, MERGE_TIMEOUT, what=f"rank 0 to finish stage {k} ({op.name})")
            return kept
        stats_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        counts = self._decide(op, k, stats_path, kept, stage / "dropped.jsonl")
        counts.update(op=op.name, params=self.entries[k - 1][op.name], info=_jsonable(op.info),
                      stat=op.stat, fingerprint=self._fingerprint(k),
                      seconds={"stats": round(stats_seconds, 3), "decide": round(time.perf_counter() - t1, 3),
                               "cpu": round(time.process_time() - cpu0, 3)},  # this process's (rank 0's)
                      world_size=self.world)
        write_json(done, counts)
        reasons = ", ".join(f"{r} {n}" for r, n in counts["dropped_by_reason"].items())
        self.log(f"[{k}/{len(self.ops)}] {op.name}: {counts['input']} in, kept {counts['kept']}, dropped "
                 f"{counts['dropped']}" + (f" ({reasons})" if reasons else "")
                 + f" [{stats_seconds + counts['seconds']['decide']:.1f} s]")
        return kept

    def _compute(self, op, source: Path, k: int):
        from tqdm import tqdm

        for sample in tqdm(op.input_samples(iter_samples(source)), desc=f"[{k}] {op.name}", unit="row",
                           disable=not self.progress, dynamic_ncols=True):
            op.compute_stats(sample)
            yield sample

    def _decide(self, op, k: int, stats_path: Path, kept_path: Path, dropped_path: Path) -> dict:
        n_in = count_samples(stats_path)  # lines, not parsed samples: a pass of JSON decoding saved
        n_kept = n_copies = 0
        reasons: Counter = Counter()
        with atomic_write(kept_path) as kept, atomic_write(dropped_path) as dropped:
            for sample, reason in op.select(lambda: iter_samples(stats_path)):
                for key in op.transient:
                    sample["stats"].pop(key, None)
                if reason is None:
                    kept.write(dump_sample(sample) + "\n")
                    n_kept += 1
                    n_copies += sample.get("copy", 0) > 0
                else:
                    reasons[reason] += 1
                    dropped.write(dump_sample({
                        "stage": k, "op": op.name, "id": sample["id"], "reason": reason,
                        "score": op.score(sample), "caption": sample["caption"],
                        "synthetic": sample.get("synthetic", False), "stats": sample["stats"]}) + "\n")
        return {"input": n_in, "kept": n_kept, "copies": n_copies, "dropped": sum(reasons.values()),
                "dropped_by_reason": dict(reasons.most_common())}

    # ---- outputs -----------------------------------------------------------------------------------
    def write_outputs(self, final: Path) -> dict:
        files = {"records": self.out / "records.jsonl", "ledger": self.out / "ledger.jsonl"}
        n = synthetic = 0
        with atomic_write(files["records"]) as out:
            for sample in iter_samples(final):
                score = sample["stats"].get("consistency")
                out.write(dump_record({**sample, "score": score}) + "\n")
                n += 1
                synthetic += bool(sample.get("synthetic"))
        with atomic_write(files["ledger"]) as ledger:
            for k in range(1, len(self.ops) + 1):
                with open(self.stage_dir(k) / "dropped.jsonl", encoding="utf-8") as handle:
                    for line in handle:
                        ledger.write(line)
        if self.recipe.export_tsv:
            files["tsv"] = self.out / "curated.tsv"
            write_contest_tsv(final, files["tsv"])
        if self.recipe.export_data_juicer:
            from .formats import export_data_juicer

            files["data_juicer"] = export_data_juicer(final, self.out / "data_juicer")
        return {"rows": n, "synthetic": synthetic, "files": {k: str(v) for k, v in files.items()}}

    def run(self) -> dict | None:
        t0 = time.perf_counter()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            # rank 0 alone writes files atomically here (the others write shards): a killed run's temps go
            remove_stale_temps_under(self.out)
        path = self.input_stage()
        for k in range(1, len(self.ops) + 1):
            path = self.run_stage(k, path)
        if self.rank != 0:
            return None
        stages = [json.loads((self.stage_dir(k) / "done.json").read_text()) for k in range(1, len(self.ops) + 1)]
        outputs = self.write_outputs(path)
        summary = {"recipe": asdict(self.recipe), "input_rows": json.loads(
                       (self.input_dir() / "done.json").read_text())["rows"],
                   "output": outputs, "stages": stages,
                   "seconds": round(time.perf_counter() - t0, 3),
                   "stage_seconds": round(sum(s["seconds"]["stats"] + s["seconds"]["decide"] for s in stages), 3)}
        from .report import write_report

        summary["report"] = write_report(self, summary)
        write_json(self.out / "summary.json", summary)
        return summary

    def stage_files(self) -> list[Path]:
        """The stats files of the stages, in order (the report reads them)."""
        return [self.stage_dir(k) / "stats.jsonl" for k in range(1, len(self.ops) + 1)]


def write_contest_tsv(samples_path: Path, out_path: Path) -> int:
    """The samples as contest rows `id \\t base64 \\t caption`; ids made unique (`id~k` for the k-th
    repeat of an id) so that convert_labels.py keeps every row."""
    from ..data.contest_tsv import parse_row
    from ..data.records import read_row_bytes

    seen: Counter = Counter()
    n = 0
    with atomic_write(out_path) as out:
        for sample in iter_samples(samples_path):
            row = parse_row(read_row_bytes(sample), test=True)
            seen[sample["id"]] += 1
            row_id = sample["id"] if seen[sample["id"]] == 1 else f"{sample['id']}~{seen[sample['id']] - 1}"
            out.write(f"{row_id}\t{row.image_b64.decode('ascii')}\t{sample['caption']}\n")
            n += 1
    return n


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def curate(recipe: Recipe, **kwargs) -> dict | None:
    try:
        return CurationRun(recipe, **kwargs).run()
    except OSError as err:
        raise UserError(f"I/O error: {err.filename or ''} {err.strerror or err}".strip()) from None
