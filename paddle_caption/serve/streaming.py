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

from .engine import EngineError, Job
from .protocol import ApiError

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
                    if await is_disconnected():
                        return
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


def sse(payload) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    body = payload if isinstance(payload, str) else payload.model_dump_json(exclude_unset=False)
    return f"data: {body}\n\n"


def error_event(err: ApiError) -> dict:
    return err.body()


def json_line(payload) -> str:
    return (payload.model_dump_json(exclude_none=True) if hasattr(payload, "model_dump_json")
            else json.dumps(payload, ensure_ascii=False)) + "\n"
