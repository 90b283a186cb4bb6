"""`python predict_batch.py TEST.tsv RESULTS.txt MODEL_DIR [options]`: caption a test TSV for submission.

TEST.tsv rows are `id \\t base64-image` (a third caption column is ignored). RESULTS.txt gets one
`id \\t caption` line per input id, in input order; unusable rows get an empty caption and a line in
RESULTS.txt.rejects. The prompt is the one the model was trained with (MODEL_DIR/prompt.json), unless
`--prompt_file`/`--system_file` replace a part. `--resume` keeps the results of an interrupted run.
MODEL_DIR may also be an exported directory (tools/export_model.py), run by Paddle Inference
(`--engine inference`, the default for such a directory).
`--dtype` is the dtype the model computes in (default: the checkpoint's where this device computes in
it, else float32; bfloat16/float16 need a GPU and are refused on a CPU in one line).

Several GPUs/processes: under `python -m paddle.distributed.launch --gpus 0,1,2,3 predict_batch.py
TEST.tsv RESULTS.txt MODEL_DIR`, or with `--rank R --world_size W` on each of W processes, each rank
captions every W-th row and rank 0 merges one ordered RESULTS.txt (see paddle_caption/predict/shards.py).
"""
from __future__ import annotations

import argparse

from ..decoding.config import GenerationConfig
from ..decoding.derive import add_flags, config_from_args
from ..decoding.drafting import DEFAULT_DRAFT_TOKENS, SPECULATIVE_MODES
from ..model.precision import DTYPES
from ..runtime import UserError, configure
from .predictor import ENGINES
from .run import PredictOptions


def build_parser(decoding=GenerationConfig) -> argparse.ArgumentParser:
    """The flags; the decoding ones are derived from `decoding` (a GenerationConfig dataclass)."""
    p = argparse.ArgumentParser(prog="predict_batch.py", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("test_tsv", help="id<TAB>base64 rows (a third column is ignored)")
    p.add_argument("results", help="output: id<TAB>caption per input id, in input order")
    p.add_argument("model_dir", help="config.json + model.safetensors [+ prompt.json, qwen.tiktoken]")
    p.add_argument("--batch_size", type=int, default=16)
    add_flags(p.add_argument_group("decoding (GenerationConfig)"), decoding)
    p.add_argument("--speculative", choices=SPECULATIVE_MODES, default="none",
                   help="draft-and-verify greedy decoding, same captions in fewer forwards: 'retrieval' "
                        "drafts from the training captions (MODEL_DIR/draft_datastore or --draft_source), "
                        "'heads' with the model's draft heads (MODEL_DIR/draft_heads.*), 'hybrid' with both")
    p.add_argument("--draft_source", help="captions file (records.jsonl or one caption per line) or "
                                          "datastore directory to draft from (default: MODEL_DIR/draft_datastore)")
    p.add_argument("--num_draft_tokens", type=int, default=DEFAULT_DRAFT_TOKENS,
                   help="most tokens drafted per row and step")
    p.add_argument("--prompt_file", help="instruction text (default: MODEL_DIR/prompt.json's)")
    p.add_argument("--system_file", help="system message text (default: MODEL_DIR/prompt.json's)")
    p.add_argument("--resume", action="store_true", help="keep the results of an interrupted run")
    p.add_argument("--rank", type=int, help="this process's shard (default: PADDLE_TRAINER_ID or 0)")
    p.add_argument("--world_size", type=int, help="number of shards (default: PADDLE_TRAINERS_NUM or 1)")
    p.add_argument("--num_threads", type=int, help="CPU threads (default: OMP_NUM_THREADS, else the core count)")
    p.add_argument("--dtype", choices=DTYPES, help="the model's dtype (default: the checkpoint's where "
                   "this device computes in it, else float32; bfloat16/float16 need a GPU)")
    p.add_argument("--engine", choices=ENGINES, help="dygraph (the eager model) or inference (Paddle Inference "
                   "graphs of tools/export_model.py); default: what MODEL_DIR holds")
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--min_side", type=int, default=PredictOptions.min_side,
                   help="reject images with a side below this (0: no limit)")
    p.add_argument("--max_pixels", type=int, default=PredictOptions.max_pixels,
                   help="refuse an image whose header declares more pixels: a decompression bomb "
                        f"(default {PredictOptions.max_pixels}); larger photos below it are decoded at a reduced scale")
    p.add_argument("--max_compression_ratio", type=float, default=PredictOptions.max_compression_ratio,
                   help="refuse an image above 16.7 MP with more RGB bytes per payload byte: a decompression bomb "
                        f"(default {PredictOptions.max_compression_ratio:g})")
    p.add_argument("--decode_side", type=int, default=PredictOptions.decode_side,
                   help="decode a large image at the smallest scale keeping both sides >= this (JPEG: in the "
                        f"IDCT; default {PredictOptions.decode_side}; the model reads 448 or 336); 0: full size")
    p.add_argument("--merge_timeout", type=float, default=PredictOptions.merge_timeout,
                   help="rank 0: seconds to wait for the other shards")
    p.add_argument("--scores", action="store_true", help="a third RESULTS.txt column: each caption's mean token "
                   "log-probability under the model (higher is more confident; drop low ones)")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.num_threads)
    from .run import format_summary, predict_file

    try:  # the one validation, before the model loads
        gen = config_from_args(args)
    except ValueError as err:
        raise UserError(str(err)) from None
    opts = PredictOptions(batch_size=args.batch_size, generation=gen, prompt_file=args.prompt_file,
                          system_file=args.system_file, resume=args.resume, rank=args.rank,
                          world_size=args.world_size, limit=args.limit, min_side=args.min_side,
                          max_pixels=args.max_pixels, max_compression_ratio=args.max_compression_ratio,
                          decode_side=args.decode_side,
                          merge_timeout=args.merge_timeout, progress=not args.no_progress, dtype=args.dtype,
                          speculative=args.speculative, draft_source=args.draft_source,
                          num_draft_tokens=args.num_draft_tokens, engine=args.engine, scores=args.scores)
    summary = predict_file(args.test_tsv, args.results, args.model_dir, opts)
    print(format_summary(summary))
    return 0
