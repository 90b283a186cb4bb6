"""Caption a test TSV for submission: the run that ties the predictor, the input and the shards.

RESULTS.txt gets one `id \\t caption` line per input id, in input order; tabs and line breaks
inside a caption become spaces. A row that cannot be used gets an empty caption and a line
`id \\t reason` in RESULTS.txt.rejects (always written, empty if none); see `inputs.py`.

Batching: rows are cut into batches in input order (every row has the same prompt, so there is no
length to sort by); each batch's images are decoded and preprocessed together (the next batch's on
a second thread while this one generates) and encoded once. Crash safety, resume and several processes:
`paddle_caption/shards.py`.
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..distributed import rank_and_world
from ..decoding.config import GenerationConfig
from ..runtime import UserError
from .predictor import Predictor, load_predictor
from ..data.contest_tsv import rejects_path, write_results
from ..data.images import DECODE_SIDE, MAX_COMPRESSION_RATIO, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE
from ..shards import ShardWriter, file_signature, fingerprint, read_shard, shard_path, share, wait_for_shards
from .inputs import TestRow, load_batch, read_test_rows


@dataclass
class PredictOptions:
    batch_size: int = 16
    generation: GenerationConfig | None = None  # None: the predictor's (greedy, 128 new tokens)
    prompt_file: str | None = None  # replaces the model's training instruction
    system_file: str | None = None  # replaces the model's system message
    resume: bool = False
    rank: int | None = None  # None: PADDLE_TRAINER_ID, else 0
    world_size: int | None = None  # None: PADDLE_TRAINERS_NUM, else 1
    limit: int | None = None  # only the first `limit` rows of the input
    min_side: int = MIN_IMAGE_SIDE  # smaller images are rejected (the converter's rule); 0 disables
    # Refused as decompression bombs (images.py): more pixels in the header, or (above 16.7 MP) more
    # RGB bytes per payload byte; a large photo is decoded at a reduced scale down to decode_side.
    max_pixels: int = MAX_IMAGE_PIXELS
    max_compression_ratio: float = MAX_COMPRESSION_RATIO
    decode_side: int = DECODE_SIDE  # decode at the smallest scale keeping both sides >= this; 0: full size
    # Speculative greedy decoding (same captions, fewer forwards): "none" | "retrieval", drafting
    # from draft_source (a captions file or datastore dir; default MODEL_DIR/draft_datastore).
    speculative: str = "none"
    draft_source: str | None = None
    num_draft_tokens: int | None = None  # None: decoding.drafting.DEFAULT_DRAFT_TOKENS
    progress: bool = True
    merge_timeout: float = 24 * 3600.0  # rank 0: seconds to wait for the other shards
    dtype: str | None = None  # the model's dtype; None: as stored where the device computes in it, else float32
    engine: str | None = None  # "dygraph" | "inference"; None: what the model directory holds (predictor.resolve_engine)
    poll_seconds: float = 2.0
    # RESULTS.txt gets a third column: each caption's mean token log-probability (decoding/logprobs.py;
    # empty for a rejected row or an empty caption), to drop low-confidence captions
    scores: bool = False

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1, got {self.limit}")
        if self.min_side < 0 or self.max_pixels < 1 or self.decode_side < 0 or self.max_compression_ratio <= 0:
            raise UserError("need min_side >= 0, max_pixels >= 1, decode_side >= 0 and max_compression_ratio > 0")
        from ..decoding.drafting import SPECULATIVE_MODES

        if self.speculative not in SPECULATIVE_MODES:
            raise UserError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, not {self.speculative!r}")
        if self.num_draft_tokens is not None and self.num_draft_tokens < 1:
            raise UserError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")


def predict_tsv(predictor: Predictor, test_tsv: str | os.PathLike, results_path: str | os.PathLike,
                opts: PredictOptions | None = None) -> dict:
    """Caption this rank's share of TEST.tsv; rank 0 also merges all shards into RESULTS.txt.

    Returns a summary dict (see `format_summary`).
    """
    from tqdm import tqdm

    from ..decoding.scheduler import SpeculationStats

    opts = opts or PredictOptions()
    opts.validate()
    test_tsv, results_path = Path(test_tsv), Path(results_path)
    rank, world = rank_and_world(opts.rank, opts.world_size)
    gen = predictor.gen_config if opts.generation is None else predictor.fill_stop_and_pad_ids(opts.generation)
    rows = read_test_rows(test_tsv, opts.limit)
    mine = list(share(rows, rank, world))
    fp = fingerprint({
        "test": file_signature(test_tsv) + [len(rows)],
        "model": predictor.source, "dtype": predictor.model.dtype, "template": asdict(predictor.template),
        "generation": asdict(gen),
        "limit": opts.limit, "world_size": world, "min_side": opts.min_side, "max_pixels": opts.max_pixels,
        "decode_side": opts.decode_side,
        **({"scores": True} if opts.scores else {})})  # (absent when off: earlier runs' shards still resume)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    partial = shard_path(results_path, rank, world)

    previous = read_shard(partial, keep_items=True) if opts.resume else None
    if previous is not None and previous.fingerprint not in (None, fp):
        raise UserError(f"{partial} was made with a different input, model, prompt or generation "
                        f"settings; delete it or run without --resume")
    done = previous.keyed() if previous is not None else {}
    todo = [row for row in mine if row.id not in done]
    stats = {"predicted": 0, "tokens": 0, "speculation": SpeculationStats()}
    start = time.perf_counter()
    writer = ShardWriter(partial, fp, previous)
    limits = {"max_pixels": opts.max_pixels, "min_side": opts.min_side, "decode_side": opts.decode_side,
              "max_ratio": opts.max_compression_ratio}
    try:
        if todo:
            batches = [todo[i:i + opts.batch_size] for i in range(0, len(todo), opts.batch_size)]
            with open(test_tsv, "rb") as handle, ThreadPoolExecutor(1) as loader, \
                    tqdm(total=len(todo), unit="img", disable=not opts.progress, dynamic_ncols=True,
                         desc=f"predict rank {rank}/{world}" if world > 1 else "predict") as bar:
                # The next batch's images are decoded on the other core while this batch generates
                # (PIL releases the GIL); ~5 ms per image that no longer adds to the run time.
                def submit(batch_no: int):
                    return loader.submit(load_batch, handle.fileno(), batches[batch_no],
                                         predictor.preprocess, **limits)

                pending = submit(0)
                for batch_no, batch in enumerate(batches):
                    images, rejects = pending.result()
                    if batch_no + 1 < len(batches):
                        pending = submit(batch_no + 1)
                    writer.add(_caption_batch(predictor, batch, images, rejects, gen, batch_no, stats, opts.scores))
                    bar.update(len(batch))
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(tok_s=f"{stats['tokens'] / max(elapsed, 1e-9):.0f}", refresh=False)
        if not (previous is not None and previous.complete):
            writer.finish(len(mine))
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    own = read_shard(partial, keep_items=True).keyed()  # exactly what is on disk: old and new results

    summary = {
        "rank": rank, "world_size": world, "images": len(mine), "resumed": len(mine) - len(todo),
        "predicted": stats["predicted"], "rejected": sum(1 for row in mine if own[row.id][1]),
        "tokens": stats["tokens"], "seconds": round(seconds, 3),
        "images_per_s": round(len(todo) / seconds, 3) if seconds > 0 else 0.0,
        "tokens_per_s": round(stats["tokens"] / seconds, 1) if seconds > 0 else 0.0,
        "results": None, "rejects": None, "fingerprint": fp,
    }
    if predictor.drafter is not None:
        summary["speculative"] = {"mode": predictor.drafter.name, **stats["speculation"].summary()}
        budget = getattr(predictor.drafter, "budget", None)
        if budget is not None:  # how often drafting paid on this machine (decoding/draft_budget.py)
            summary["speculative"]["budget"] = budget.summary()
    if rank != 0:
        return summary
    merged = dict(own)
    if world > 1:
        for state in wait_for_shards(results_path, range(1, world), world, len(rows), fp, opts.merge_timeout,
                                     opts.poll_seconds, keep_items=True).values():
            merged.update(state.keyed())
    if opts.scores:  # a caption never holds a tab (clean_caption): the score is the third column
        merged = {rid: (f"{caption}\t{score}", reason) for rid, (caption, reason, score) in merged.items()}
    n_rejects = write_results(results_path, [row.id for row in rows], merged)
    for rank_no in range(world):
        with contextlib.suppress(FileNotFoundError):
            shard_path(results_path, rank_no, world).unlink()
    summary.update(total_images=len(rows), total_rejected=n_rejects, results=str(results_path),
                   rejects=str(rejects_path(results_path)))
    return summary


def _caption_batch(predictor: Predictor, batch: list[TestRow], images: dict, rejects: dict,
                   gen: GenerationConfig, batch_no: int, stats: dict, scores: bool = False) -> list[tuple]:
    """Caption the batch's good images together (the model's prompt for each); (id, caption,
    reject reason) per row, and with `scores` the caption's mean log-probability ("" if none)."""
    captions, means = {}, {}
    keep = [row for row in batch if row.id in images]
    if keep:
        config = gen
        if config.do_sample:  # a fresh, reproducible random stream per batch
            config = replace(config, seed=config.seed + batch_no)
        token_ids = predictor.generate_ids([images[row.id] for row in keep], config=config,
                                           stats=stats["speculation"])
        for row, ids in zip(keep, token_ids):
            captions[row.id] = predictor.decode(ids)
            stats["tokens"] += len(ids)
        if scores:
            means = _mean_logprobs(predictor, [images[row.id] for row in keep], token_ids, keep)
    stats["predicted"] += len(keep)
    if scores:
        return [(row.id, captions.get(row.id, ""), rejects.get(row.id, ""), means.get(row.id, "")) for row in batch]
    return [(row.id, captions.get(row.id, ""), rejects.get(row.id, "")) for row in batch]


def _mean_logprobs(predictor: Predictor, images: list, token_ids: list[list[int]], rows) -> dict:
    """{id: mean token log-probability as text ("" for an empty caption)}, scored teacher-forced."""
    from ..decoding.logprobs import mean_logprob, teacher_forced

    entries = teacher_forced(predictor.model, [predictor.prompt_ids] * len(images), predictor.pixels(images),
                             token_ids, predictor.tokenizer.pad_id)
    means = [mean_logprob(e) for e in entries]
    return {row.id: "" if m is None else f"{m:.4f}" for row, m in zip(rows, means)}


def predict_file(test_tsv: str | os.PathLike, results_path: str | os.PathLike, model_dir: str | os.PathLike,
                 opts: PredictOptions | None = None) -> dict:
    """Load MODEL_DIR and caption TEST.tsv into RESULTS.txt (see the module docstring)."""
    opts = opts or PredictOptions()
    opts.validate()
    rank_and_world(opts.rank, opts.world_size)  # fail on bad rank settings before the model load
    start = time.perf_counter()
    predictor = load_predictor(model_dir, opts.generation, opts.prompt_file, opts.system_file, opts.dtype,
                               opts.speculative, opts.draft_source, opts.num_draft_tokens,
                               log=print if opts.progress else None, engine=opts.engine)
    load_seconds = time.perf_counter() - start
    summary = predict_tsv(predictor, test_tsv, results_path, opts)
    summary["load_seconds"] = round(load_seconds, 3)
    return summary


def format_summary(summary: dict) -> str:
    head = (f"rank {summary['rank']}/{summary['world_size']}: " if summary["world_size"] > 1 else "")
    text = (f"{head}{summary['images']} images ({summary['resumed']} resumed, {summary['predicted']} "
            f"predicted, {summary['rejected']} rejected) in {summary['seconds']:.1f} s: "
            f"{summary['images_per_s']:.2f} images/s, {summary['tokens_per_s']:.1f} tokens/s")
    spec = summary.get("speculative")
    if spec:
        text += (f"\nspeculative decoding ({spec['mode']}): {spec['tokens_per_step']:.2f} tokens per decode step; "
                 f"{spec['accepted']} of {spec['drafted']} drafted tokens accepted ({100 * spec['acceptance_rate']:.1f}%), "
                 f"{spec['accepted_per_verify']:.2f} per verify step")
    if summary.get("results"):
        text += (f"\nwrote {summary['results']} ({summary['total_images']} ids) and "
                 f"{summary['rejects']} ({summary['total_rejected']} rejected)")
    return text
