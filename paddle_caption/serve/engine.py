"""The caption engine: one thread owns the model, a queue feeds it, batches form and re-form.

Requests become `Job`s of one or more `Sequence`s (a prompt and its images). `submit` queues the
sequences (refused with `QueueFull` past `max_queue`); the engine thread then loops:

1. Admission. When nothing is running it waits for the first sequence and then up to
   `max_wait_ms` for more, until `max_batch_size` rows are waiting (dynamic batching). While a
   batch is decoding, whatever is waiting joins it at the next step boundary, up to
   `max_batch_size` rows (continuous batching): the new rows are prefilled together and their KV
   caches merged into the running batch (`decoding.scheduler.ContinuousBatch`), with their own
   settings. Every kind of request shares that batch: a greedy or sampling sequence takes one row,
   a beam-search sequence `num_beams` rows that the scheduler re-selects every step; rows are
   counted against `max_batch_size` (a sequence wider than that runs when the batch is empty).
2. One decode step for every running row; rows that stop or reach their max_new_tokens leave the
   batch, and a job's future resolves when its last sequence is done. With a drafter
   (`--speculative retrieval`), a step verifies drafted tokens too and may add several tokens to a
   greedy row: the same tokens, fewer steps (decoding/scheduler.py).
3. Rows of jobs that were cancelled (client gone, timeout) are dropped at the step boundary, which
   frees their slots at once; their queued sequences are removed when the job is cancelled.

Streaming and log-probabilities: after every step, a sequence with a `listener` (the service's
stream) is handed the tokens it gained (several with speculative decoding; a beam sequence
nothing until its search ends: then its `candidates`) and their `decoding.logprobs.TokenLogprob`s when its
config asks for them (a `LogprobRecorder` watches the batch). A beam sequence's candidates are
scored with a teacher-forced forward when it finishes. Listeners run on the engine thread and
must only hand the values over (e.g. `loop.call_soon_threadsafe`).

A failure while prefilling or stepping fails the jobs involved (`EngineError`, logged with its
traceback) and the engine carries on with an empty batch. `status()` reports whether the thread is
alive and when it last made progress; the service's /health turns 503 on either. `stop()` stops
admitting new jobs, finishes everything queued and running, and ends the thread.

The engine reads everything from the `Predictor` it is given: the model, the pad id, the drafter
and `Predictor.pixels` (the images-to-tensor step predict_batch.py takes). A sequence's tokens do
not depend on which others share its batch (the generation tests show it), so a request's caption
equals predict_batch.py's for the same image.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

from ..decoding.config import GenerationConfig

log = logging.getLogger("paddle_caption.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` images already."""


class EngineStopped(Exception):
    """The engine is shutting down or its thread is gone."""


class EngineError(Exception):
    """The model failed on this job (the engine itself keeps running)."""


@dataclass
class EngineOptions:
    max_batch_size: int = 16  # rows decoded together (vLLM's --max-num-seqs)
    max_wait_ms: float = 10.0  # an idle engine waits this long for a first batch to fill
    max_queue: int = 256  # images waiting; more is QueueFull (HTTP 503)
    idle_poll_s: float = 0.5  # an idle engine wakes this often (its heartbeat)

    def validate(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            raise ValueError("need max_batch_size >= 1, max_queue >= 1, max_wait_ms >= 0")


@dataclass
class Sequence:
    """One generation: prompt ids, one preprocessed image per `<img>` span, settings."""

    prompt: list
    images: list  # float32 arrays [3, S, S]
    config: GenerationConfig  # stop and pad ids filled in
    job: "Job" = None
    tokens: list | None = None
    finish_reason: str | None = None
    latency_s: float = 0.0
    candidates: list | None = None  # the num_return_sequences token lists (beam: best first)
    logprobs: list | None = None  # per candidate, its TokenLogprobs (config.logprobs)
    # listener(seq, new_tokens, new_logprobs or None, finished): called on the engine thread
    listener: object = None
    sent: int = 0  # tokens handed to the listener so far


class Job:
    """The sequences of one request; `future` resolves to them, finished, in order."""

    def __init__(self, sequences: list[Sequence], arrived: float | None = None):
        self.sequences = sequences
        for seq in sequences:
            seq.job = self
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.arrived = time.monotonic() if arrived is None else arrived  # time.monotonic() of the request
        self.cancelled = False
        self.remaining = len(sequences)

    def _finish_one(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            _resolve(self.future, result=self.sequences)


def _resolve(future: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Set a future unless its waiter already gave up on it (cancelled it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


@dataclass
class EngineStatus:
    alive: bool
    stopping: bool
    queued: int
    running: int
    seconds_since_progress: float
    error: str | None = None
    steps: int = 0


class CaptionEngine:
    """Owns `predictor.model` on one thread (see the module docstring); `metrics` (optional) is a
    `telemetry.ServiceMetrics` it reports into."""

    def __init__(self, predictor, options: EngineOptions | None = None, metrics=None):
        from ..decoding.logprobs import LogprobRecorder
        from ..decoding.scheduler import ContinuousBatch, SpeculationStats

        self.predictor, self.options, self.metrics = predictor, options or EngineOptions(), metrics
        self.options.validate()
        model = self.model = predictor.model
        model.eval()
        self.speculation = SpeculationStats()  # tokens generated, and what drafting did
        def new_batch():
            batch = ContinuousBatch(model, predictor.tokenizer.pad_id, predictor.drafter, self.speculation)
            batch.observer = self._recorder = LogprobRecorder()
            return batch

        self._new_batch = new_batch
        self._batch = self._new_batch()
        self._queue: collections.deque[Sequence] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_progress = time.monotonic()
        self._steps = 0
        self._error: str | None = None  # why the thread died, if it did
        self._token_log: collections.deque = collections.deque()  # (time, tokens) of the last 10 s
        self._token_lock = threading.Lock()
        if metrics is not None:
            metrics.watch(self)

    # ---- the service's side ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="caption-engine", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cv:
            if not self.alive:
                raise EngineStopped("the engine is not running" + (f" ({self._error})" if self._error else ""))
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if len(self._queue) + len(job.sequences) > self.options.max_queue:
                raise QueueFull(f"the queue is full ({len(self._queue)} of {self.options.max_queue} images waiting)")
            self._queue.extend(job.sequences)
            self._cv.notify()
        return job.future

    def cancel(self, job: Job) -> None:
        """The client is gone: forget the job's queued sequences now, its running rows at the next step."""
        with self._cv:
            job.cancelled = True
            before = len(self._queue)
            self._queue = collections.deque(s for s in self._queue if s.job is not job)
            dropped = before - len(self._queue)
        if dropped and self.metrics is not None:
            self.metrics.on_cancel(dropped)
        job.future.cancel()  # nobody waits for it now; a result the engine still sets is dropped (_resolve)

    def stop(self, timeout: float | None = None) -> bool:
        """Admit nothing new, finish what is queued and running, end the thread. True if it ended."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._batch)

    def status(self) -> EngineStatus:
        return EngineStatus(self.alive, self._stopping, self.queued, self.running,
                            time.monotonic() - self._last_progress, self._error, self._steps)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        with self._token_lock:
            return sum(n for t, n in self._token_log if t > now - window) / window

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._last_progress = time.monotonic()
                admitted = self._admit()
                if admitted is None:
                    break
                if admitted:
                    self._prefill(admitted)
                if self._batch:
                    self._step()
        except BaseException as err:  # the loop itself broke: fail everyone, /health says so
            log.exception("caption engine died")
            self._error = f"{type(err).__name__}: {err}"
            with self._cv:
                waiting, self._queue = list(self._queue), collections.deque()
            for seq in waiting + [row.tag for row in self._batch.requests]:
                _resolve(seq.job.future, error=EngineError(f"the engine died: {self._error}"))

    def _admit(self) -> list[Sequence] | None:
        """Sequences to prefill now ([] = none); None = stopped and drained."""
        opts = self.options
        with self._cv:
            if not self._batch:
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cv.wait(opts.idle_poll_s)
                    return []
                deadline = time.monotonic() + opts.max_wait_ms / 1000
                while len(self._queue) < opts.max_batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            room = opts.max_batch_size - len(self._batch)  # cache rows: a beam sequence takes num_beams
            admitted = []
            while self._queue:
                seq = self._queue[0]
                if seq.config.rows > room and (admitted or self._batch):
                    break  # first come, first served: it waits for rows to free up
                self._queue.popleft()
                if not seq.job.cancelled:
                    admitted.append(seq)
                    room -= seq.config.rows
            return admitted

    def _prefill(self, sequences: list[Sequence]) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.on_prefill(len(sequences), [now - s.job.arrived for s in sequences])
        try:
            pixels = self.predictor.pixels([image for seq in sequences for image in seq.images])
            self._batch.add([s.prompt for s in sequences], pixels, [s.config for s in sequences], tags=sequences)
        except Exception as err:  # noqa: BLE001 - a model failure fails these jobs, not the engine
            log.exception("prefill failed")
            self._fail(sequences, err)

    def _step(self) -> None:
        self._drop_cancelled()
        if not self._batch:
            return
        rows = len(self._batch)
        requests = self._batch.requests  # each gets what it gained this step (streams, logprobs)
        before = (self.speculation.tokens, self.speculation.drafted, self.speculation.accepted)
        try:
            finished = self._batch.step()
        except Exception as err:  # noqa: BLE001
            log.exception("decode step failed")
            failed = [row.tag for row in self._batch.requests]
            self._batch = self._new_batch()
            self._fail(failed, err)
            return
        self._steps += 1
        tokens, drafted, accepted = (now - then for now, then in zip(
            (self.speculation.tokens, self.speculation.drafted, self.speculation.accepted), before))
        self._count_tokens(tokens)
        if self.metrics is not None:
            self.metrics.on_step(rows)
            if drafted:
                self.metrics.on_drafts(drafted, accepted)
        done = {id(row) for row in finished}
        for row in requests:
            if row.beams is None:
                try:
                    self._progress(row, finished=id(row) in done)
                except Exception as err:  # noqa: BLE001 - fails this job (its rows leave next step), not the engine
                    log.exception("reporting tokens failed")
                    self._fail([row.tag], err)
        for row in finished:
            self._finish(row)

    def _progress(self, row, finished: bool) -> None:
        """Hand a greedy/sampling row's new tokens (and log-probs) to its sequence's listener."""
        seq = row.tag
        entries = self._recorder.collect(row) if row.config.logprobs else None
        if seq.listener is not None and (len(row.tokens) > seq.sent or finished):
            new = row.tokens[seq.sent:]
            seq.listener(seq, list(new), None if entries is None else entries[seq.sent:], False)
            seq.sent = len(row.tokens)
        if finished:
            seq.logprobs = None if entries is None else [list(entries)]

    def _drop_cancelled(self) -> None:
        gone = [row for row in self._batch.requests if row.tag.job.cancelled]
        if gone:
            self._batch.drop(gone)
            for row in gone:
                self._recorder.forget(row)
            if self.metrics is not None:
                self.metrics.on_cancel(len(gone))

    def _finish(self, row) -> None:
        seq = row.tag
        self._recorder.forget(row)
        seq.tokens, seq.finish_reason = list(row.tokens), row.finish_reason
        seq.candidates = [list(c) for c in row.candidates] if row.candidates is not None else [seq.tokens]
        if row.beams is not None and row.config.logprobs:  # beams are re-selected each step: score them now
            try:
                seq.logprobs = self._score(seq)
            except Exception as err:  # noqa: BLE001 - a model failure fails this job, not the engine
                log.exception("scoring beam candidates failed")
                self._fail([seq], err)
                return
        seq.latency_s = time.monotonic() - seq.job.arrived
        if seq.listener is not None:  # (a beam sequence's listener reads seq.candidates now)
            seq.listener(seq, [], None, True)
        if self.metrics is not None:
            self.metrics.on_row_done(seq.latency_s)
        seq.job._finish_one()

    def _score(self, seq: Sequence) -> list:
        """Teacher-forced log-probs of each of a finished sequence's candidates."""
        from ..decoding.logprobs import teacher_forced

        k = len(seq.candidates)
        images = self.predictor.pixels([image for _ in range(k) for image in seq.images])
        return teacher_forced(self.model, [seq.prompt] * k, images, seq.candidates,
                              self.predictor.tokenizer.pad_id, seq.config.top_logprobs)

    def _fail(self, sequences: list[Sequence], err: Exception) -> None:
        for seq in sequences:
            _resolve(seq.job.future, error=EngineError(f"{type(err).__name__}: {err}"))
            seq.job.cancelled = True  # its other sequences are dropped at the next boundary

    def _count_tokens(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.on_tokens(n)
        now = time.monotonic()
        with self._token_lock:
            self._token_log.append((now, n))
            while self._token_log and self._token_log[0][0] < now - 10.0:
                self._token_log.popleft()
