"""`paddle-caption-serve MODEL_DIR` (also `python -m paddle_caption.serve MODEL_DIR`): the caption
service — an OpenAI-compatible chat endpoint with image parts, a simple captions endpoint, health,
Prometheus metrics and a web page — on one engine thread with dynamic and continuous batching.

    paddle-caption-serve checkpoints/demo/image/model [--host 127.0.0.1] [--port 8000] [--api_key KEY]
        [--max_batch_size 16] [--max_wait_ms 10] [--max_queue 256] [--request_timeout 120]
        [--max_body_mb 32] [--max_image_pixels 16777216] [--max_images_per_request 16]
        [--max_tokens_cap 512] [--default_max_tokens 128] [--max_num_beams 8] [--max_n 8] [--dtype bfloat16]
        [--engine dygraph|inference] ...

SIGTERM (or Ctrl-C) stops accepting connections, finishes the requests in flight and exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from ..decoding.drafting import DEFAULT_DRAFT_TOKENS, SPECULATIVE_MODES
from ..model.precision import DTYPES
from ..runtime import UserError, configure, limit_malloc_arenas, run_cli
from .engine import EngineOptions
from .service import ServiceLimits

API_KEY_ENV = "PADDLE_CAPTION_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    lim, eng = ServiceLimits(), EngineOptions()
    p = argparse.ArgumentParser(prog="paddle-caption-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="config.json + model.safetensors [+ prompt.json, qwen.tiktoken]")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})")
    p.add_argument("--served_model_name", help="the model id in /v1/models and responses (default: MODEL_DIR as given)")
    g = p.add_argument_group("batching")
    g.add_argument("--max_batch_size", type=int, default=eng.max_batch_size, help="rows decoded together")
    g.add_argument("--max_wait_ms", type=float, default=eng.max_wait_ms,
                   help="an idle engine waits this long for a batch to fill")
    g.add_argument("--max_queue", type=int, default=eng.max_queue, help="images waiting; beyond: 503 + Retry-After")
    g = p.add_argument_group("limits")
    g.add_argument("--max_body_mb", type=float, default=lim.max_body_bytes / (1 << 20), help="request body (413)")
    g.add_argument("--max_image_pixels", type=int, default=lim.max_image_pixels,
                   help="width x height per image, checked before decoding (413)")
    g.add_argument("--min_image_side", type=int, default=lim.min_image_side, help="smaller images are a 400")
    g.add_argument("--max_images_per_request", type=int, default=lim.max_images_per_request, help="(413)")
    g.add_argument("--max_tokens_cap", type=int, default=lim.max_tokens_cap, help="largest max_tokens (400)")
    g.add_argument("--default_max_tokens", type=int, default=lim.default_max_tokens)
    g.add_argument("--max_num_beams", type=int, default=lim.max_num_beams, help="(400)")
    g.add_argument("--max_n", type=int, default=lim.max_n, help="chat candidates per request, n (400)")
    g.add_argument("--request_timeout", type=float, default=lim.request_timeout_s, help="seconds (504)")
    g.add_argument("--health_deadline", type=float, default=lim.health_deadline_s,
                   help="/health is 503 when the engine made no progress for this many seconds")
    g = p.add_argument_group("model")
    g.add_argument("--prompt_file", help="instruction text (default: MODEL_DIR/prompt.json's)")
    g.add_argument("--system_file", help="system message text (default: MODEL_DIR/prompt.json's)")
    g.add_argument("--num_threads", type=int, help="CPU threads (default: OMP_NUM_THREADS, else the core count)")
    g.add_argument("--dtype", choices=DTYPES, help="the model's dtype (default: the checkpoint's where this "
                   "device computes in it, else float32; bfloat16/float16 need a GPU)")
    g.add_argument("--engine", choices=("dygraph", "inference"), help="dygraph (the eager model) or inference "
                   "(Paddle Inference graphs of tools/export_model.py); default: what MODEL_DIR holds")
    g.add_argument("--speculative", choices=SPECULATIVE_MODES, default="none",
                   help="draft-and-verify greedy decoding (same captions, fewer steps), as predict_batch.py")
    g.add_argument("--draft_source", help="captions file or datastore directory to draft from "
                                          "(default: MODEL_DIR/draft_datastore)")
    g.add_argument("--num_draft_tokens", type=int, default=DEFAULT_DRAFT_TOKENS, help="most tokens drafted per row and step")
    p.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def limits_from_args(args) -> tuple[ServiceLimits, EngineOptions]:
    limits = ServiceLimits(
        max_body_bytes=int(args.max_body_mb * (1 << 20)), max_image_pixels=args.max_image_pixels,
        min_image_side=args.min_image_side, max_images_per_request=args.max_images_per_request,
        max_tokens_cap=args.max_tokens_cap, default_max_tokens=args.default_max_tokens,
        max_num_beams=args.max_num_beams, max_n=args.max_n, request_timeout_s=args.request_timeout,
        health_deadline_s=args.health_deadline)
    engine = EngineOptions(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)
    try:
        limits.validate()
        engine.validate()
    except ValueError as err:
        raise UserError(str(err)) from None
    return limits, engine


def build_service(model_dir, limits: ServiceLimits | None = None, engine_options: EngineOptions | None = None,
                  model_name: str | None = None, prompt_file: str | None = None, system_file: str | None = None,
                  dtype: str | None = None, speculative: str = "none", draft_source=None,
                  num_draft_tokens: int | None = None, engine: str | None = None):
    """Load MODEL_DIR -> (CaptionService, ServiceMetrics); the engine thread starts with the app."""
    from .engine import CaptionEngine
    from .telemetry import ServiceMetrics
    from ..predict.predictor import load_predictor
    from .service import CaptionService

    predictor = load_predictor(model_dir, prompt_file=prompt_file, system_file=system_file, dtype=dtype,
                               speculative=speculative, draft_source=draft_source,
                               num_draft_tokens=num_draft_tokens, engine=engine)
    metrics = ServiceMetrics()
    engine = CaptionEngine(predictor, engine_options, metrics)
    root = Path(model_dir).resolve()
    service = CaptionService(predictor, engine, limits, model_name or str(model_dir), str(root))
    return service, metrics


def main(argv=None) -> int:
    limit_malloc_arenas()  # before any thread allocates: see its docstring (RSS under a long soak)
    args = build_parser().parse_args(argv)
    configure(args.num_threads)
    limits, engine_options = limits_from_args(args)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")

    import uvicorn

    from .app import create_app

    service, metrics = build_service(args.model_dir, limits, engine_options, args.served_model_name,
                                     args.prompt_file, args.system_file, args.dtype, args.speculative,
                                     args.draft_source, args.num_draft_tokens, args.engine)
    app = create_app(service, metrics, api_key=api_key, stop_timeout=limits.request_timeout_s)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=limits.request_timeout_s + 5, server_header=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped on once it has shut down; with this handler in place
    # that lands here instead of killing the process, so a graceful SIGTERM exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    print(f"serving {service.model_name} on http://{args.host}:{args.port}/ (web page), "
          f"/v1/chat/completions, /v1/captions, /health, /metrics"
          + (" (API key required on /v1)" if api_key else ""), file=sys.stderr, flush=True)
    server.run()
    if not server.started:
        raise UserError(f"could not start the server on {args.host}:{args.port} (see the log above)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
