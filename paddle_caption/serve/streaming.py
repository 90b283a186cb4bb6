"""Streamed answers: a job's tokens as they are decided, as server-sent events of OpenAI's
`chat.completion.chunk` (`/v1/chat/completions`, `stream: true`) or JSON lines
(`/v1/captions`, `stream: true`).

The engine hands each sequence's new tokens to its listener after every step (engine.py); here
they cross to the event loop (`JobStream`), and `CaptionText` turns them into text deltas: the
caption so far is decoded and cleaned exactly as the whole caption is (`Predictor.decode`), and a
delta is sent only up to the last complete character (a token may end inside a multi-byte
character: the decoder's trailing U+FFFD is held back until the next token completes it). So
the deltas concatenate to the non-streamed caption. With speculative decoding one delta may carry
several tokens; a beam search sends its candidates when the search ends.

A stream that ends early (the client went away, the timeout passed) cancels its job: the engine
drops its rows at the next step. Errors before the first event (bad input, queue full) are plain
JSON error responses with their status; after it, an error is one last event.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from .choices import candidates, openai_logprobs
from .engine import EngineError, Job
from .protocol import ApiError, CaptionStreamEvent, ChatCompletionChunk, ChunkChoice, ChunkDelta

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering either


class CaptionText:
    """The text sent so far of one caption; `update(tokens)` -> the delta to send now."""

    def __init__(self, decode):
        self.decode, self.sent = decode, ""

    def update(self, tokens: list, final: bool = False) -> str:
        text = self.decode(tokens)
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete character: wait for the token that completes it
        if not text.startswith(self.sent):  # cleaning changed earlier text (cannot with clean_caption); wait
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


class JobStream:
    """A submitted job's sequences as (index, sequence, new tokens, new logprobs, finished) events on the
    event loop. Iterate `events()`; the job is cancelled if iteration stops before the end."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job, self.queue = job, asyncio.Queue()
        self.index = {id(seq): k for k, seq in enumerate(job.sequences)}
        for seq in job.sequences:
            seq.listener = lambda *event: loop.call_soon_threadsafe(self.queue.put_nowait, event)
        # an engine error resolves the future without any finished event: it ends the stream
        job.future.add_done_callback(lambda f: loop.call_soon_threadsafe(self.queue.put_nowait, f))

    async def events(self, engine, timeout: float, is_disconnected):
        remaining, complete = len(self.job.sequences), False
        try:
            while remaining:
                left = self.job.arrived + timeout - time.monotonic()
                if left <= 0:
                    raise ApiError(504, f"no result within {timeout:g} s (--request_timeout)", type="timeout")
                try:
                    event = await asyncio.wait_for(self.queue.get(), min(left, 0.2))
                except asyncio.TimeoutError:
                    event = None
                if await is_disconnected():  # (a non-blocking look: no need to wait for a failed send)
                    return
                if event is None:
                    continue
                if not isinstance(event, tuple):  # the future resolved
                    if not event.cancelled() and event.exception() is not None:
                        err = event.exception()
                        if isinstance(err, EngineError):
                            raise ApiError(500, f"captioning failed: {err}", type="server_error")
                        raise ApiError(500, f"captioning failed ({type(err).__name__})", type="server_error")
                    continue
                remaining -= event[3]
                yield (self.index[id(event[0])], *event)
            complete = True
        finally:
            if not complete:
                engine.cancel(self.job)


def sse(data: str) -> str:
    """One server-sent event: `data: <data>` and a blank line."""
    return f"data: {data}\n\n"


def json_line(event: CaptionStreamEvent) -> str:
    return event.model_dump_json(exclude_none=True) + "\n"


async def chat_events(service, req, stream: JobStream, is_disconnected):
    """`req`'s answer as server-sent events of `chat.completion.chunk`s, then `data: [DONE]`."""
    rid, created, tok = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), service.predictor.tokenizer
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    def chunk(choices, usage=None) -> str:
        body = ChatCompletionChunk(id=rid, created=created, model=service.model_name, choices=choices,
                                   usage=usage).model_dump(mode="json")
        for choice in body["choices"]:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not include_usage:
            del body["usage"]
        return sse(json.dumps(body, ensure_ascii=False))

    sequences = stream.job.sequences
    beams = sequences[0].config.num_beams > 1
    for index in range(req.n):
        yield chunk([ChunkChoice(index=index, delta=ChunkDelta(role="assistant", content=""))])
    texts = [CaptionText(service.predictor.decode) for _ in sequences]
    so_far = [[] for _ in sequences]
    try:
        async for k, seq, tokens, entries, finished in stream.events(service.engine, service.limits.request_timeout_s,
                                                                  is_disconnected):
            if beams and finished:  # the whole search at once: each of the n best
                for c in candidates([seq]):
                    yield chunk([ChunkChoice(index=c.index, delta=ChunkDelta(content=service.predictor.decode(c.tokens)),
                                             logprobs=openai_logprobs(tok, c.logprobs))])
                    yield chunk([ChunkChoice(index=c.index, delta=ChunkDelta(), finish_reason=c.finish_reason)])
                continue
            so_far[k] += tokens
            delta = texts[k].update(so_far[k], final=finished)
            if delta or entries:
                yield chunk([ChunkChoice(index=k, delta=ChunkDelta(content=delta),
                                         logprobs=openai_logprobs(tok, entries) if entries else None)])
            if finished:
                yield chunk([ChunkChoice(index=k, delta=ChunkDelta(), finish_reason=seq.finish_reason)])
    except ApiError as err:
        yield sse(json.dumps(err.body()))
    else:
        if include_usage:
            yield chunk([], service.usage(sequences[0].prompt, [c.tokens for c in candidates(sequences)]))
    yield sse("[DONE]")


async def caption_events(service, ids: list[str], stream: JobStream, is_disconnected):
    """JSON lines of `CaptionStreamEvent`s: deltas of each image's caption, then its result."""
    sequences = stream.job.sequences
    texts = [CaptionText(service.predictor.decode) for _ in sequences]
    so_far = [[] for _ in sequences]
    try:
        async for k, seq, tokens, _, finished in stream.events(service.engine, service.limits.request_timeout_s,
                                                            is_disconnected):
            so_far[k] += tokens if not finished or seq.config.num_beams == 1 else seq.tokens
            delta = texts[k].update(so_far[k], final=finished)
            if delta:
                yield json_line(CaptionStreamEvent(index=k, id=ids[k], delta=delta))
            if finished:
                yield json_line(CaptionStreamEvent(index=k, id=ids[k], result=service.caption_result(ids[k], seq)))
    except ApiError as err:
        yield json_line(CaptionStreamEvent(error=err.body()["error"]))
