"""The serving logic between the HTTP schemas and the engine: requests become engine jobs (images
decoded and checked against the limits, prompts built as in training), jobs are awaited with a
timeout and a watch on the client, and finished sequences become responses.

Captioning goes through the same pieces as predict_batch.py: `Predictor.preprocess` (the image
transform), the model's training prompt (`load_template` / `build_prompt_ids`), the decoding
package, and `Predictor.decode` (`clean_caption`). So a request's greedy caption equals
predict_batch.py's for the same image (tested).

Status codes: 400 bad input (named), 401 no/wrong API key (routes), 404 unknown model, 413 body,
image pixels or image count over the limit, 415 wrong content type, 503 queue full (with
Retry-After) or shutting down, 504 request timeout, 500 only when the model itself fails (a JSON
message, never a traceback). A client that goes away gets its job cancelled, which frees its rows.

A chat request with n > 1 samples is n sequences (candidate k samples with seed + k, so candidate 0
is the n=1 answer); with beams it is one sequence whose n best hypotheses are the choices.
`/v1/captions` always records log-probabilities (each caption's `mean_logprob`). Streamed answers
are streaming.py's.
"""
from __future__ import annotations

import asyncio
import base64
import threading
import time
import uuid
from dataclasses import dataclass, replace

import numpy as np

from ..data.images import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, ImageRejected, b64decode_strict, decode_image
from ..data.reject_reasons import REJECT_REASONS
from ..data.prompts import PromptTemplate
from ..data.samples import build_prompt_ids
from ..decoding.config import GenerationConfig
from .choices import candidates, mean, openai_logprobs
from .engine import CaptionEngine, EngineError, EngineStopped, Job, QueueFull, Sequence
from .protocol import (ApiError, AssistantMessage, CaptionOptions, CaptionResult, ChatChoice, ChatCompletionRequest,
                       ChatCompletionResponse, ModelCard, ModelList, TextPart, Usage)
from .streaming import JobStream, caption_events, chat_events

GALLERY_SIZE, GALLERY_SEED = 6, 2024


@dataclass
class ServiceLimits:
    """Every request limit (each a CLI flag of `paddle-caption-serve`)."""

    max_body_bytes: int = 32 << 20  # 413
    max_image_pixels: int = MAX_IMAGE_PIXELS  # 413; the decompression-bomb guard (checked on the header)
    min_image_side: int = MIN_IMAGE_SIDE  # 400; predict_batch.py's rule
    max_images_per_request: int = 16  # 413
    max_tokens_cap: int = 512  # 400 above it
    default_max_tokens: int = 128  # predict_batch.py's default
    max_num_beams: int = 8  # 400 above it
    max_n: int = 8  # chat candidates per request (n); 400 above it
    request_timeout_s: float = 120.0  # 504
    health_deadline_s: float = 60.0  # /health is 503 when the engine made no progress for this long
    retry_after_s: int = 1  # Retry-After of a 503 (queue full)

    def validate(self) -> None:
        if min(self.max_body_bytes, self.max_image_pixels, self.max_images_per_request, self.max_tokens_cap,
               self.default_max_tokens, self.max_num_beams, self.max_n) < 1 or self.min_image_side < 0:
            raise ValueError("every limit must be >= 1 (min_image_side >= 0)")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} exceeds max_tokens_cap {self.max_tokens_cap}")
        if self.request_timeout_s <= 0 or self.health_deadline_s <= 0:
            raise ValueError("request_timeout and health_deadline must be > 0")


class ClientGone(Exception):
    """The client disconnected while its job was running; nobody reads the answer."""


class CaptionService:
    def __init__(self, predictor, engine: CaptionEngine, limits: ServiceLimits | None = None,
                 model_name: str = "paddle-caption", model_root: str = "in-memory model"):
        self.predictor, self.engine = predictor, engine
        self.model_root = model_root  # where the weights came from (/v1/models "root")
        self.limits = limits or ServiceLimits()
        self.limits.validate()
        self.model_name = model_name
        self.created = int(time.time())
        self.context = int(predictor.model.config.seq_length)
        self._gallery = None
        self._gallery_lock = threading.Lock()

    # ---- images --------------------------------------------------------------------------------
    def image(self, payload: str | bytes, where: str) -> np.ndarray:
        """Base64 text (or raw bytes of an upload) -> the preprocessed image, or a 400/413 naming `where`."""
        limits = self.limits
        try:
            data = b64decode_strict(payload) if isinstance(payload, str) else payload
            img = decode_image(data, max_pixels=limits.max_image_pixels, min_side=limits.min_image_side)
        except ImageRejected as err:
            detail = f" ({err.detail})" if err.detail else ""
            if err.reason == "too_many_pixels":
                raise ApiError(413, f"{where}: image has too many pixels{detail}; the limit is "
                                    f"{limits.max_image_pixels} (--max_image_pixels)", param=where) from None
            if err.reason == "image_too_small":
                raise ApiError(400, f"{where}: image too small{detail}; the minimum side is "
                                    f"{limits.min_image_side} px (--min_image_side)", param=where) from None
            raise ApiError(400, f"{where}: {REJECT_REASONS[err.reason].summary if err.reason in REJECT_REASONS else err.reason}{detail}", param=where) from None
        return self.predictor.preprocess(img)

    def _check_image_count(self, n: int) -> None:
        if n > self.limits.max_images_per_request:
            raise ApiError(413, f"{n} images in one request; the limit is {self.limits.max_images_per_request} "
                                "(--max_images_per_request)")

    # ---- generation settings -------------------------------------------------------------------
    def generation_config(self, options: GenerationConfig, *, max_new_tokens: int | None,
                          max_name: str) -> GenerationConfig:
        """A request's decoding options (`options`, checked when the request was parsed) within
        this service's limits, with its maximum length (the default when None; `max_name` is the
        name errors use) and the tokenizer's stop and pad ids."""
        limits = self.limits
        max_new = limits.default_max_tokens if max_new_tokens is None else max_new_tokens
        if max_new > limits.max_tokens_cap:
            raise ApiError(400, f"{max_name} {max_new} exceeds the limit {limits.max_tokens_cap} (--max_tokens_cap)",
                           param=max_name)
        if options.num_beams > limits.max_num_beams:
            raise ApiError(400, f"num_beams {options.num_beams} exceeds the limit {limits.max_num_beams} "
                                "(--max_num_beams)", param="num_beams")
        return self.predictor.fill_stop_and_pad_ids(replace(options, max_new_tokens=max_new))

    def _check_context(self, prompt: list[int], cfg) -> None:
        if len(prompt) + cfg.max_new_tokens > self.context:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus {cfg.max_new_tokens} new tokens exceeds "
                                f"the model's context of {self.context} tokens")

    # ---- requests -> jobs (run in a worker thread: image decoding is CPU work) ------------------
    def chat_job(self, req: ChatCompletionRequest, arrived: float) -> Job:
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"model '{req.model}' not found; this server serves '{self.model_name}'",
                           type="not_found_error", param="model")
        systems, user = [], None
        for i, msg in enumerate(req.messages):
            where = f"messages.{i}"
            if msg.role == "assistant":
                raise ApiError(400, f"{where}: earlier assistant turns are not supported; send optional "
                                    "system messages and one user message", param=where)
            if msg.role == "system":
                if user is not None:
                    raise ApiError(400, f"{where}: system messages must come before the user message", param=where)
                if not isinstance(msg.content, str) and any(not isinstance(p, TextPart) for p in msg.content):
                    raise ApiError(400, f"{where}: a system message holds text only", param=where)
                systems.append(msg.content if isinstance(msg.content, str) else "\n".join(p.text for p in msg.content))
            elif user is not None:
                raise ApiError(400, f"{where}: send one user message (its content may hold several parts)", param=where)
            else:
                user = (i, msg)
        if user is None:
            raise ApiError(400, "no user message: send one with an image_url part", param="messages")
        index, msg = user
        parts = [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else msg.content
        texts = [p.text for p in parts if isinstance(p, TextPart)]
        urls = [(k, p.image_url.url) for k, p in enumerate(parts) if not isinstance(p, TextPart)]
        if not urls:
            raise ApiError(400, f"messages.{index}: a text-only request; this model captions images: add an "
                                '{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}} part',
                           param=f"messages.{index}.content")
        self._check_image_count(len(urls))
        images = []
        for k, url in urls:
            where = f"messages.{index}.content.{k}.image_url.url"
            images.append(self.image(parse_data_url(url, where), where))
        template = self.predictor.template
        text = "\n".join(t for t in texts if t.strip())
        prompt = build_prompt_ids(self.predictor.tokenizer, PromptTemplate(
            system="\n".join(systems) if systems else template.system, prompt=text or template.prompt), len(images))
        cfg = self.generation_config(req.generation, max_new_tokens=req.requested_max_tokens, max_name="max_tokens")
        self._check_context(prompt, cfg)
        if req.n > self.limits.max_n:
            raise ApiError(400, f"n {req.n} exceeds the limit {self.limits.max_n} (--max_n)", param="n")
        if cfg.num_beams > 1 or req.n == 1:  # beams: one search, its n best hypotheses
            return Job([Sequence(prompt, images, cfg)], arrived)
        return Job([Sequence(prompt, images, replace(cfg, num_return_sequences=1, seed=cfg.seed + k))
                    for k in range(req.n)], arrived)

    def caption_job(self, items: list[tuple[str, str | bytes, str]], opts: CaptionOptions, arrived: float) -> Job:
        """`items` are (id, base64 text or data URL or raw file bytes, where it came from in the
        request, for error messages); each image is its own sequence."""
        if not items:
            raise ApiError(400, "no image: send 'image' or 'images' (JSON) or an 'image' file (multipart)")
        self._check_image_count(len(items))
        template = self.predictor.template
        if opts.prompt is not None or opts.system is not None:
            template = PromptTemplate(system=template.system if opts.system is None else opts.system,
                                      prompt=template.prompt if opts.prompt is None else opts.prompt)
        prompt = build_prompt_ids(self.predictor.tokenizer, template, 1)
        cfg = self.generation_config(opts.generation, max_new_tokens=opts.max_new_tokens, max_name="max_new_tokens")
        cfg = replace(cfg, logprobs=True)  # each caption's mean_logprob
        self._check_context(prompt, cfg)
        sequences = []
        for k, (_, payload, at) in enumerate(items):
            if isinstance(payload, str) and payload.startswith("data:"):
                payload = parse_data_url(payload, at)
            # image k samples with seed + k, as predict_batch.py's batches do
            seq_cfg = replace(cfg, seed=cfg.seed + k) if cfg.do_sample else cfg
            sequences.append(Sequence(prompt, [self.image(payload, at)], seq_cfg))
        return Job(sequences, arrived)

    # ---- running jobs --------------------------------------------------------------------------
    def submit(self, job: Job):
        try:
            return self.engine.submit(job)
        except QueueFull as err:
            raise ApiError(503, f"{err}; retry later", type="server_busy",
                           headers={"Retry-After": str(self.limits.retry_after_s)}) from None
        except EngineStopped as err:
            raise ApiError(503, str(err), type="service_unavailable") from None

    async def run(self, job: Job, is_disconnected) -> list[Sequence]:
        """Queue the job and wait for it; cancel it if the client goes away or the timeout passes."""
        waiter = asyncio.wrap_future(self.submit(job))
        timeout = self.limits.request_timeout_s
        try:
            while not waiter.done():
                left = job.arrived + timeout - time.monotonic()
                if left <= 0:
                    self.engine.cancel(job)
                    raise ApiError(504, f"no result within {timeout:g} s (--request_timeout)", type="timeout")
                await asyncio.wait({waiter}, timeout=min(left, 0.2))
                if not waiter.done() and await is_disconnected():
                    self.engine.cancel(job)
                    raise ClientGone()
            return waiter.result()
        except EngineError as err:
            raise ApiError(500, f"captioning failed: {err}", type="server_error") from None
        except asyncio.CancelledError:
            self.engine.cancel(job)
            raise

    async def chat(self, req: ChatCompletionRequest, arrived: float, is_disconnected) -> ChatCompletionResponse:
        from starlette.concurrency import run_in_threadpool

        job = await run_in_threadpool(self.chat_job, req, arrived)
        if req.stream:
            return chat_events(self, req, self.stream(job), is_disconnected)
        sequences = await self.run(job, is_disconnected)
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=self.predictor.decode(c.tokens)),
                              finish_reason=c.finish_reason,
                              logprobs=openai_logprobs(self.predictor.tokenizer, c.logprobs))
                   for c in candidates(sequences)]
        return ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                      model=self.model_name, choices=choices,
                                      usage=self.usage(sequences[0].prompt, [c.tokens for c in candidates(sequences)]))

    @staticmethod
    def usage(prompt: list, outputs: list[list]) -> Usage:
        generated = sum(len(tokens) for tokens in outputs)
        return Usage(prompt_tokens=len(prompt), completion_tokens=generated, total_tokens=len(prompt) + generated)

    def stream(self, job: Job) -> JobStream:
        """Submit `job` for streaming (a full queue is a 503 here, before any event)."""
        stream = JobStream(job, asyncio.get_running_loop())
        self.submit(job)
        return stream

    async def captions(self, items: list[tuple[str, str | bytes, str]], opts: CaptionOptions, arrived: float,
                       is_disconnected) -> list[CaptionResult]:
        from starlette.concurrency import run_in_threadpool

        job = await run_in_threadpool(self.caption_job, items, opts, arrived)
        if opts.stream:
            return caption_events(self, [item_id for item_id, _, _ in items], self.stream(job), is_disconnected)
        sequences = await self.run(job, is_disconnected)
        return [self.caption_result(item_id, seq) for (item_id, _, _), seq in zip(items, sequences)]

    def caption_result(self, item_id: str, seq: Sequence) -> CaptionResult:
        (best,) = candidates([seq])[:1]
        return CaptionResult(id=item_id, caption=self.predictor.decode(seq.tokens), tokens=len(seq.tokens),
                             latency_ms=round(seq.latency_s * 1000, 1), mean_logprob=mean(best.logprobs),
                             finish_reason=seq.finish_reason)

    # ---- the rest ------------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created, root=self.model_root)])

    def health(self) -> tuple[int, dict]:
        st = self.engine.status()
        reason = None
        if not st.alive:
            reason = "the engine thread is not running" + (f" ({st.error})" if st.error else "")
        elif st.stopping:
            reason = "shutting down"
        elif st.seconds_since_progress > self.limits.health_deadline_s:
            reason = (f"the engine has made no progress for {st.seconds_since_progress:.0f} s "
                      f"(deadline {self.limits.health_deadline_s:g} s)")
        body = {"status": "ok" if reason is None else "unavailable", "model": self.model_name,
                "queued": st.queued, "running": st.running, "decode_steps": st.steps,
                "seconds_since_progress": round(st.seconds_since_progress, 3)}
        if reason:
            body["reason"] = reason
        return (200 if reason is None else 503), body

    def gallery(self) -> list[dict]:
        """A few synthetic ads (the demo model's world) for the web page: id, JPEG bytes, reference."""
        with self._gallery_lock:
            if self._gallery is None:
                from ..data.synthetic import generate_split

                self._gallery = [{"id": row.id, "jpeg": base64.b64decode(row.image_b64), "reference": row.caption}
                                 for row in generate_split("test", GALLERY_SIZE, seed=GALLERY_SEED)]
        return self._gallery


def parse_data_url(url: str, where: str) -> str:
    """`data:image/...;base64,PAYLOAD` -> PAYLOAD; anything else is a 400 naming `where`."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url[:16] else "a plain string"
        raise ApiError(400, f"{where}: only data: URLs are accepted (data:image/jpeg;base64,...), got {scheme}; "
                            "the server does not fetch remote images", param=where)
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ApiError(400, f"{where}: malformed data URL (no comma before the payload)", param=where)
    media, *params = header.split(";")
    if "base64" not in params:
        raise ApiError(400, f"{where}: the data URL must be base64 (data:image/jpeg;base64,...)", param=where)
    if media and not media.lower().startswith("image/"):
        raise ApiError(400, f"{where}: the data URL's media type {media!r} is not an image", param=where)
    return payload
