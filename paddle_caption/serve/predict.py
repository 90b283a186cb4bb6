"""Batch captioning of a test TSV for leaderboard submission.

    python predict_batch.py TEST.tsv RESULTS.txt MODEL_DIR [--batch_size 16] [--max_new_tokens 128]
        [--num_beams N] [--do_sample --top_p P --top_k K --temperature T --seed S]
        [--repetition_penalty R] [--length_penalty L] [--prompt_file F] [--system_file F]
        [--resume] [--rank R --world_size W] [--num_threads N] [--limit N]

TEST.tsv rows are `id \\t base64-image` (a third caption column is ignored). RESULTS.txt gets one
`id \\t caption` line per input id, in input order; tabs and line breaks inside a caption become
spaces. An image that cannot be used (bad base64, undecodable, smaller than `--min_side`) gets an
empty caption and a line `id \\t reason` in RESULTS.txt.rejects (always written, empty if none).

The prompt is the one the model was trained with: MODEL_DIR/prompt.json (`{"system", "prompt"}`)
if present, else config/prompts/style_aware.txt + chat_system.txt; `--prompt_file`/`--system_file`
replace either part.

Batching: rows are sorted by prompt length (stable, so equal lengths keep input order) and cut into
batches; each batch's images are decoded and preprocessed together and encoded once, in the
prefill of `paddle_caption.model.generation.generate` (left padding, KV cache, finished rows leave
the batch). Greedy output does not depend on the batch: batched == one-by-one, token for token.

Crash safety: each batch's results are appended to RESULTS.txt.partial (JSON lines, flushed and
fsynced per batch). `--resume` keeps what the partial file holds, made with the same input, model
and generation settings (a fingerprint on its first line says so), and predicts only the rest; a
torn last line is dropped. RESULTS.txt itself is written once, complete and atomically, and then
the partial file is deleted.

Several GPUs/processes: under `python -m paddle.distributed.launch --gpus 0,1,2,3 predict_batch.py
TEST.tsv RESULTS.txt MODEL_DIR` (which sets PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM), or with
`--rank R --world_size W` on each of W processes, rank R predicts the rows i with i % W == R (i = row
number in the input) into RESULTS.txt.partial.rank{R}-of-{W}, and ends it with a completion line.
Rank 0 then waits until every shard is complete (same fingerprint, only its own ids) and merges
them into RESULTS.txt. All ranks must see the same directory (one machine, or a shared file system).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.images import ImageRejected, b64decode_strict, decode_image, preprocess_image
from ..data.records import DEFAULT_MAX_ROW_BYTES, TsvLine, iter_lines, normalize_id
from ..data.samples import PromptTemplate, build_prompt_ids, read_prompt_file
from ..runtime import UserError, atomic_write, configure_environment, remove_stale_temps, run_cli

if TYPE_CHECKING:  # generation imports paddle; keep this module importable before paddle is set up
    from ..model.generation import GenerationConfig

PARTIAL_FORMAT = "paddle_caption.predict.partial/1"
PROMPT_JSON = "prompt.json"
# Characters that some reader would take as a column or line break inside a caption.
_BREAKS = re.compile(r"[\t\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")
# The id of a row too long to hold (see records.iter_lines) is read from its first bytes.
_ID_PEEK_BYTES = 4096


@dataclass
class PredictOptions:
    batch_size: int = 16
    generation: "GenerationConfig | None" = None  # None: the predictor's (default greedy, 128 new tokens)
    prompt_file: str | None = None  # replaces the model's training instruction
    system_file: str | None = None  # replaces the model's system message
    resume: bool = False
    rank: int | None = None  # None: PADDLE_TRAINER_ID, else 0
    world_size: int | None = None  # None: PADDLE_TRAINERS_NUM, else 1
    limit: int | None = None  # only the first `limit` rows of the input
    min_side: int = 32  # smaller images are rejected (the converter's default rule); 0 disables
    max_pixels: int = 4096 * 4096  # bounds decode memory, as the converter
    progress: bool = True
    merge_timeout: float = 24 * 3600.0  # rank 0: seconds to wait for the other shards
    poll_seconds: float = 2.0

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1, got {self.limit}")
        if self.min_side < 0 or self.max_pixels < 1:
            raise UserError("need min_side >= 0 and max_pixels >= 1")


# ------------------------------------------------------------------------------------ prompts
def load_template(model_dir: str | os.PathLike | None = None, prompt_file: str | None = None,
                  system_file: str | None = None) -> PromptTemplate:
    """The model directory's training prompt (prompt.json), else the packaged default; either part
    can be replaced by a file."""
    base = None
    path = Path(model_dir) / PROMPT_JSON if model_dir is not None else None
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        if not (isinstance(data, dict) and isinstance(data.get("system"), str)
                and isinstance(data.get("prompt"), str)):
            raise UserError(f'{path}: expected {{"system": str, "prompt": str}}')
        base = PromptTemplate(system=data["system"], prompt=data["prompt"])
    if base is None:
        base = PromptTemplate.from_files()
    return PromptTemplate(system=read_prompt_file(system_file) if system_file else base.system,
                          prompt=read_prompt_file(prompt_file) if prompt_file else base.prompt)


def clean_caption(text: str) -> str:
    """One submission field: no tab or line break inside, no surrounding whitespace."""
    return _BREAKS.sub(" ", text).strip()


# ------------------------------------------------------------------------------------ predictor
class Predictor:
    """Captions images with an already-loaded model (also used by the demo's in-memory model).

    `images` are preprocessed float32 arrays [3, S, S] (`self.preprocess(pil_image)`); `prompts`, if
    given, are per-image prompt ids (default: the template's single-image prompt for every image).
    """

    def __init__(self, model, tokenizer, template: PromptTemplate,
                 gen_config: "GenerationConfig | None" = None, source: str = "in-memory model"):
        from ..model.generation import GenerationConfig

        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.gen_config = gen_config or GenerationConfig()
        self.gen_config.validate()
        self.prompt_ids = build_prompt_ids(tokenizer, template)
        self.image_size = int(model.config.visual.image_size)
        self.source = source  # what the model is, for the resume/merge fingerprint

    def preprocess(self, img) -> np.ndarray:
        return preprocess_image(img, self.image_size)

    def generate_ids(self, images: list[np.ndarray], prompts: list[list[int]] | None = None,
                     config: "GenerationConfig | None" = None) -> list[list[int]]:
        """New token ids per image (stop id excluded); the images are encoded once, as one batch."""
        from ..model.generation import generate
        from ..runtime import import_paddle

        if not images:
            return []
        prompts = [self.prompt_ids] * len(images) if prompts is None else prompts
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        paddle = import_paddle()
        dtype = next(iter(self.model.parameters())).dtype
        pixels = paddle.to_tensor(np.stack(images)).astype(dtype)
        return generate(self.model, [list(p) for p in prompts], pixels, config or self.gen_config)

    def decode(self, ids: list[int]) -> str:
        return clean_caption(self.tokenizer.decode(ids, skip_special_tokens=True))

    def caption_batch(self, images: list[np.ndarray], prompts: list[list[int]] | None = None) -> list[str]:
        return [self.decode(ids) for ids in self.generate_ids(images, prompts)]


def load_predictor(model_dir: str | os.PathLike, gen_config: "GenerationConfig | None" = None,
                   prompt_file: str | None = None, system_file: str | None = None) -> Predictor:
    """Load MODEL_DIR (config.json + weights [+ prompt.json, qwen.tiktoken]) into a Predictor."""
    from ..model.mgen_vl import MgenVLForCausalLM
    from ..tokenizer import QWenVLTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    template = load_template(model_dir, prompt_file, system_file)  # prompt errors before the slow load
    try:
        model = MgenVLForCausalLM.from_pretrained(model_dir)
        tokenizer = QWenVLTokenizer.for_model(model.config, model_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model {model_dir}: {err}") from None
    return Predictor(model, tokenizer, template, gen_config, source=_model_dir_signature(model_dir))


def _model_dir_signature(model_dir: Path) -> str:
    """Path + size and mtime of every file in the model directory: changes when the model does."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    return json.dumps([str(model_dir.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
                                                   for p in files])


# ------------------------------------------------------------------------------------ input
@dataclass
class TestRow:
    index: int  # position in the (limited) input
    id: str
    line: TsvLine  # offset/length of the row; `data` is dropped after the scan to bound memory


def read_test_rows(path: str | os.PathLike, limit: int | None = None) -> list[TestRow]:
    """Scan TEST.tsv once for ids and row positions (images are read per batch, later).

    Blank lines are skipped. A row without an image column, with more than three columns, with an
    empty or non-UTF-8 id, or repeating an earlier id is a UserError naming its line.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read test file {path}: {err.strerror or err}") from None
    rows: list[TestRow] = []
    first_line: dict[str, int] = {}
    with handle:
        for lineno, line in enumerate(iter_lines(handle), 1):
            if limit is not None and len(rows) >= limit:
                break
            head = line.data if line.data is not None else os.pread(handle.fileno(), _ID_PEEK_BYTES, line.offset)
            if not head.strip():
                continue
            cols = head.split(b"\t", 3)
            if line.data is not None and not 2 <= len(cols) <= 3:
                raise UserError(f"{path}:{lineno}: expected 'id<TAB>base64[<TAB>caption]', "
                                f"got {len(cols)} column(s)")
            if len(cols) < 2:
                raise UserError(f"{path}:{lineno}: no tab in the first {_ID_PEEK_BYTES} bytes of an over-long row")
            try:
                rid = normalize_id(cols[0].decode("utf-8"))
            except UnicodeDecodeError:
                raise UserError(f"{path}:{lineno}: the id is not valid UTF-8") from None
            if not rid:
                raise UserError(f"{path}:{lineno}: empty id")
            if rid in first_line:
                raise UserError(f"{path}:{lineno}: duplicate id {rid!r} (first on line {first_line[rid]})")
            first_line[rid] = lineno
            rows.append(TestRow(len(rows), rid, TsvLine(line.offset, line.length, None)))
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def load_image(fd: int, row: TestRow, predictor: Predictor, opts: PredictOptions) -> np.ndarray:
    """Read one row back and return its preprocessed image, or raise ImageRejected."""
    if row.line.length > DEFAULT_MAX_ROW_BYTES:  # the scan did not hold it either
        raise ImageRejected("row_too_long", f"{row.line.length} bytes")
    data = os.pread(fd, row.line.length, row.line.offset)
    image_b64 = data.split(b"\t")[1]
    img = decode_image(b64decode_strict(image_b64), max_pixels=opts.max_pixels, min_side=opts.min_side)
    return predictor.preprocess(img)


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (stable: equal lengths keep their order), cut into batches, so that
    rows padded together have similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------------ shards
def shard_rows(rows: list[TestRow], rank: int, world_size: int) -> list[TestRow]:
    return [row for row in rows if row.index % world_size == rank]


def resolve_rank(opts: PredictOptions) -> tuple[int, int]:
    """(rank, world_size) from the options, else paddle.distributed.launch's variables, else (0, 1)."""
    def env_int(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        try:
            return int(value) if value else default
        except ValueError:
            raise UserError(f"environment variable {name}={value!r} is not an integer") from None

    rank = opts.rank if opts.rank is not None else env_int("PADDLE_TRAINER_ID", 0)
    world = opts.world_size if opts.world_size is not None else env_int("PADDLE_TRAINERS_NUM", 1)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world}")
    return rank, world


def partial_path(results_path: Path, rank: int, world_size: int) -> Path:
    suffix = ".partial" if world_size == 1 else f".partial.rank{rank}-of-{world_size}"
    return results_path.with_name(results_path.name + suffix)


def rejects_path(results_path: Path) -> Path:
    return results_path.with_name(results_path.name + ".rejects")


@dataclass
class PartialState:
    """What a partial file holds: its header, {id: (caption, reject reason)}, completion."""

    fingerprint: str | None = None
    results: dict = field(default_factory=dict)
    complete: bool = False
    valid_bytes: int = 0  # length of the readable prefix (a torn last line is cut off)


def read_partial(path: Path) -> PartialState:
    """Parse a partial file; a missing file or torn header is an empty state."""
    state = PartialState()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return state
    pos = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        end = pos + len(raw) + 1
        if end > len(data):  # no newline: torn by a crash mid-write
            break
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}:{lineno}: corrupt partial results; delete the file or run "
                            f"without --resume") from None
        if lineno == 1:
            if not (isinstance(item, dict) and item.get("format") == PARTIAL_FORMAT):
                raise UserError(f"{path}: not a predict partial file; delete it or run without --resume")
            state.fingerprint = item.get("fingerprint")
        elif isinstance(item, list) and len(item) == 3:
            state.results[item[0]] = (item[1], item[2])
        elif isinstance(item, dict) and "complete" in item:
            state.complete = True
        else:
            raise UserError(f"{path}:{lineno}: unexpected line in partial results; delete the file "
                            f"or run without --resume")
        pos = end
    state.valid_bytes = pos
    return state


class PartialWriter:
    """Append-only results of one rank: each batch is written, flushed and fsynced together."""

    def __init__(self, path: Path, fingerprint: str, resume_from: PartialState | None):
        self.path = path
        if resume_from is not None and resume_from.fingerprint is not None:
            with open(path, "r+b") as handle:  # drop a torn last line before appending
                handle.truncate(resume_from.valid_bytes)
            self.handle = open(path, "a", encoding="utf-8")
        else:
            self.handle = open(path, "w", encoding="utf-8")
            self._write([{"format": PARTIAL_FORMAT, "fingerprint": fingerprint}])

    def _write(self, items) -> None:
        self.handle.write("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def add(self, results: list[tuple[str, str, str]]) -> None:
        """(id, caption, reject reason or "") per image of one batch."""
        self._write([list(r) for r in results])

    def finish(self, n: int) -> None:
        self._write([{"complete": n}])

    def close(self) -> None:
        self.handle.close()


def fingerprint(test_tsv: Path, rows: list[TestRow], predictor: Predictor, gen: "GenerationConfig",
                opts: PredictOptions, world_size: int) -> str:
    """Everything that decides the results; equal on every rank of one run."""
    stat = test_tsv.stat()
    parts = {
        "test": [str(test_tsv.resolve()), stat.st_size, stat.st_mtime_ns, len(rows)],
        "model": predictor.source, "template": asdict(predictor.template),
        "generation": asdict(gen), "limit": opts.limit, "world_size": world_size,
        "min_side": opts.min_side, "max_pixels": opts.max_pixels,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def wait_for_shards(results_path: Path, rows: list[TestRow], world_size: int, fp: str,
                    opts: PredictOptions) -> dict:
    """Rank 0: block until every other rank's partial file is complete; return all their results."""
    merged: dict = {}
    pending = list(range(1, world_size))
    deadline = time.monotonic() + opts.merge_timeout
    announced = False
    while pending:
        for rank in list(pending):
            path = partial_path(results_path, rank, world_size)
            state = read_partial(path)
            if state.fingerprint != fp or not state.complete:
                continue  # not started, still running, or a stale file the rank will overwrite
            expected = {row.id for row in shard_rows(rows, rank, world_size)}
            extra = set(state.results) - expected
            missing = expected - set(state.results)
            if extra or missing:
                raise UserError(f"{path}: complete but {len(missing)} ids missing and {len(extra)} "
                                f"ids that are not this shard's; delete it and rerun rank {rank}")
            merged.update(state.results)
            pending.remove(rank)
        if not pending:
            break
        if time.monotonic() > deadline:
            names = ", ".join(str(partial_path(results_path, r, world_size)) for r in pending)
            raise UserError(f"timed out after {opts.merge_timeout:.0f} s waiting for shard(s): {names}")
        if not announced:
            print(f"rank 0: waiting for rank(s) {', '.join(map(str, pending))} to finish", file=sys.stderr)
            announced = True
        time.sleep(opts.poll_seconds)
    return merged


def write_outputs(results_path: Path, rows: list[TestRow], results: dict) -> int:
    """RESULTS.txt (every id, input order) and RESULTS.txt.rejects, each atomically; returns #rejects."""
    missing = [row.id for row in rows if row.id not in results]
    if missing:  # cannot happen unless a shard file was edited: never write an incomplete file
        raise UserError(f"no result for {len(missing)} id(s), e.g. {missing[0]!r}")
    remove_stale_temps(results_path)
    remove_stale_temps(rejects_path(results_path))
    n_rejects = 0
    with atomic_write(rejects_path(results_path)) as rejects:
        for row in rows:
            reason = results[row.id][1]
            if reason:
                rejects.write(f"{row.id}\t{reason}\n")
                n_rejects += 1
    with atomic_write(results_path) as out:
        for row in rows:
            out.write(f"{row.id}\t{results[row.id][0]}\n")
    return n_rejects


# ------------------------------------------------------------------------------------ the run
def predict_tsv(predictor: Predictor, test_tsv: str | os.PathLike, results_path: str | os.PathLike,
                opts: PredictOptions | None = None) -> dict:
    """Caption this rank's share of TEST.tsv; rank 0 also merges all shards into RESULTS.txt.

    Returns a summary dict (see `format_summary`).
    """
    from tqdm import tqdm

    opts = opts or PredictOptions()
    opts.validate()
    test_tsv, results_path = Path(test_tsv), Path(results_path)
    rank, world = resolve_rank(opts)
    gen = opts.generation or predictor.gen_config
    gen.validate()
    rows = read_test_rows(test_tsv, opts.limit)
    mine = shard_rows(rows, rank, world)
    fp = fingerprint(test_tsv, rows, predictor, gen, opts, world)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(results_path, rank, world)

    previous = read_partial(partial) if opts.resume else None
    if previous is not None and previous.fingerprint not in (None, fp):
        raise UserError(f"{partial} was made with a different input, model, prompt or generation "
                        f"settings; delete it or run without --resume")
    done = previous.results if previous is not None else {}
    todo = [row for row in mine if row.id not in done]
    stats = {"predicted": 0, "tokens": 0}
    start = time.perf_counter()
    writer = PartialWriter(partial, fp, previous)
    try:
        if todo:
            prompts = [predictor.prompt_ids] * len(todo)  # one prompt per row; the TSV has no other
            batches = [([todo[i] for i in b], [prompts[i] for i in b])
                       for b in batches_by_length([len(p) for p in prompts], opts.batch_size)]
            with open(test_tsv, "rb") as handle, ThreadPoolExecutor(1) as loader, \
                    tqdm(total=len(todo), unit="img", disable=not opts.progress, dynamic_ncols=True,
                         desc=f"predict rank {rank}/{world}" if world > 1 else "predict") as bar:
                # The next batch's images are decoded on the other core while this batch generates
                # (PIL releases the GIL); ~5 ms per image that no longer adds to the run time.
                pending = loader.submit(load_batch, handle.fileno(), batches[0][0], predictor, opts)
                for batch_no, (batch, batch_prompts) in enumerate(batches):
                    images, rejects = pending.result()
                    if batch_no + 1 < len(batches):
                        pending = loader.submit(load_batch, handle.fileno(), batches[batch_no + 1][0], predictor, opts)
                    writer.add(_caption_batch(predictor, batch, batch_prompts, images, rejects, gen, batch_no, stats))
                    bar.update(len(batch))
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(tok_s=f"{stats['tokens'] / max(elapsed, 1e-9):.0f}", refresh=False)
        if not (previous is not None and previous.complete):
            writer.finish(len(mine))
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    own = read_partial(partial).results  # exactly what is on disk: old and new results

    summary = {
        "rank": rank, "world_size": world, "images": len(mine), "resumed": len(mine) - len(todo),
        "predicted": stats["predicted"], "rejected": sum(1 for row in mine if own[row.id][1]),
        "tokens": stats["tokens"], "seconds": round(seconds, 3),
        "images_per_s": round(len(todo) / seconds, 3) if seconds > 0 else 0.0,
        "tokens_per_s": round(stats["tokens"] / seconds, 1) if seconds > 0 else 0.0,
        "results": None, "rejects": None, "fingerprint": fp,
    }
    if rank != 0:
        return summary
    merged = dict(own)
    if world > 1:
        merged.update(wait_for_shards(results_path, rows, world, fp, opts))
    n_rejects = write_outputs(results_path, rows, merged)
    for rank_no in range(world):
        with contextlib.suppress(FileNotFoundError):
            partial_path(results_path, rank_no, world).unlink()
    summary.update(total_images=len(rows), total_rejected=n_rejects, results=str(results_path),
                   rejects=str(rejects_path(results_path)))
    return summary


def load_batch(fd: int, batch: list[TestRow], predictor: Predictor,
               opts: PredictOptions) -> tuple[dict, dict]:
    """({id: preprocessed image}, {id: reject reason}) for the rows of one batch."""
    images, rejects = {}, {}
    for row in batch:
        try:
            images[row.id] = load_image(fd, row, predictor, opts)
        except ImageRejected as err:
            rejects[row.id] = err.reason
    return images, rejects


def _caption_batch(predictor: Predictor, batch: list[TestRow], prompts: list[list[int]], images: dict,
                   rejects: dict, gen: "GenerationConfig", batch_no: int, stats: dict) -> list[tuple[str, str, str]]:
    """Caption the batch's good images together; (id, caption, reject reason) per row."""
    captions = {}
    keep = [(row, prompt) for row, prompt in zip(batch, prompts) if row.id in images]
    if keep:
        config = gen
        if config.do_sample:  # a fresh, reproducible random stream per batch
            config = replace(config, seed=config.seed + batch_no)
        token_ids = predictor.generate_ids([images[row.id] for row, _ in keep], [p for _, p in keep], config)
        for (row, _), ids in zip(keep, token_ids):
            captions[row.id] = predictor.decode(ids)
            stats["tokens"] += len(ids)
    stats["predicted"] += len(keep)
    return [(row.id, captions.get(row.id, ""), rejects.get(row.id, "")) for row in batch]


def predict_file(test_tsv: str | os.PathLike, results_path: str | os.PathLike, model_dir: str | os.PathLike,
                 opts: PredictOptions | None = None) -> dict:
    """Load MODEL_DIR and caption TEST.tsv into RESULTS.txt (see the module docstring)."""
    opts = opts or PredictOptions()
    opts.validate()
    resolve_rank(opts)  # fail on bad rank settings before the model load
    start = time.perf_counter()
    predictor = load_predictor(model_dir, opts.generation, opts.prompt_file, opts.system_file)
    load_seconds = time.perf_counter() - start
    summary = predict_tsv(predictor, test_tsv, results_path, opts)
    summary["load_seconds"] = round(load_seconds, 3)
    return summary


def format_summary(summary: dict) -> str:
    head = (f"rank {summary['rank']}/{summary['world_size']}: " if summary["world_size"] > 1 else "")
    text = (f"{head}{summary['images']} images ({summary['resumed']} resumed, {summary['predicted']} "
            f"predicted, {summary['rejected']} rejected) in {summary['seconds']:.1f} s: "
            f"{summary['images_per_s']:.2f} images/s, {summary['tokens_per_s']:.1f} tokens/s")
    if summary.get("results"):
        text += (f"\nwrote {summary['results']} ({summary['total_images']} ids) and "
                 f"{summary['rejects']} ({summary['total_rejected']} rejected)")
    return text


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict_batch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("test_tsv", help="id<TAB>base64 rows (a third column is ignored)")
    p.add_argument("results", help="output: id<TAB>caption per input id, in input order")
    p.add_argument("model_dir", help="config.json + model.safetensors [+ prompt.json, qwen.tiktoken]")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (batch k uses seed + k)")
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--length_penalty", type=float, default=1.0, help="beam search only")
    p.add_argument("--prompt_file", help="instruction text (default: MODEL_DIR/prompt.json's)")
    p.add_argument("--system_file", help="system message text (default: MODEL_DIR/prompt.json's)")
    p.add_argument("--resume", action="store_true", help="keep the results of an interrupted run")
    p.add_argument("--rank", type=int, help="this process's shard (default: PADDLE_TRAINER_ID or 0)")
    p.add_argument("--world_size", type=int, help="number of shards (default: PADDLE_TRAINERS_NUM or 1)")
    p.add_argument("--num_threads", type=int, help="CPU threads (default: OMP_NUM_THREADS, else the core count)")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--min_side", type=int, default=PredictOptions.min_side,
                   help="reject images with a side below this (0: no limit)")
    p.add_argument("--merge_timeout", type=float, default=PredictOptions.merge_timeout,
                   help="rank 0: seconds to wait for the other shards")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_threads:  # an explicit flag beats an inherited OMP_NUM_THREADS
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.num_threads)
    configure_environment(args.num_threads)  # before paddle is imported
    from ..model.generation import GenerationConfig

    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                           num_beams=args.num_beams, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                           length_penalty=args.length_penalty, seed=args.seed)
    try:
        gen.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    opts = PredictOptions(batch_size=args.batch_size, generation=gen, prompt_file=args.prompt_file,
                          system_file=args.system_file, resume=args.resume, rank=args.rank,
                          world_size=args.world_size, limit=args.limit, min_side=args.min_side,
                          merge_timeout=args.merge_timeout, progress=not args.no_progress)
    summary = predict_file(args.test_tsv, args.results, args.model_dir, opts)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
