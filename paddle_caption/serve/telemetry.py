"""Prometheus metrics of the caption service, in a registry of its own (one per app, so tests and
several apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """Requests by status, queue depth, batch sizes, latency histograms, tokens/s.

    The engine reports into it (`on_prefill`, `on_step`, `on_tokens`, `on_drafts`, `on_row_done`, `on_cancel`);
    the routes count requests.
    Queue depth, running rows and tokens/s are read from the engine when /metrics is scraped.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "paddle_caption_"
        self.requests = Counter(p + "requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_latency = Histogram(p + "request_latency_seconds", "HTTP request latency by endpoint",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "images waiting for the engine", registry=r)
        self.running_rows = Gauge(p + "running_rows", "rows in the running decode batch", registry=r)
        self.tokens_per_second = Gauge(p + "tokens_per_second", "generated tokens per second over the last 10 s",
                                       registry=r)
        self.engine_alive = Gauge(p + "engine_alive", "1 while the engine thread runs", registry=r)
        self.decode_batch = Histogram(p + "decode_batch_size", "rows per decode step", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.prefill_batch = Histogram(p + "prefill_batch_size", "rows per prefill (new rows joining)",
                                       buckets=BATCH_BUCKETS, registry=r)
        self.tokens = Counter(p + "generated_tokens", "generated tokens", registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "time from arrival to prefill, per image",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.row_latency = Histogram(p + "image_latency_seconds", "time from arrival to the last token, per image",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.cancelled = Counter(p + "cancelled_rows", "images dropped because their client went away or timed out",
                                 registry=r)
        self.draft_tokens = Counter(p + "draft_tokens", "drafted tokens verified (--speculative), by outcome",
                                    ["outcome"], registry=r)

    def watch(self, engine) -> None:
        """Read the engine's live numbers at scrape time."""
        self.queue_depth.set_function(lambda: engine.queued)
        self.running_rows.set_function(lambda: engine.running)
        self.tokens_per_second.set_function(engine.tokens_per_second)
        self.engine_alive.set_function(lambda: 1.0 if engine.alive else 0.0)

    # ---- engine callbacks (engine thread) ------------------------------------------------------
    def on_prefill(self, rows: int, waits: list[float]) -> None:
        self.prefill_batch.observe(rows)
        for wait in waits:
            self.queue_wait.observe(wait)

    def on_step(self, rows: int) -> None:
        self.decode_batch.observe(rows)

    def on_tokens(self, n: int) -> None:
        self.tokens.inc(n)

    def on_drafts(self, drafted: int, accepted: int) -> None:
        self.draft_tokens.labels("accepted").inc(accepted)
        self.draft_tokens.labels("rejected").inc(drafted - accepted)

    def on_row_done(self, seconds: float) -> None:
        self.row_latency.observe(seconds)

    def on_cancel(self, rows: int) -> None:
        self.cancelled.inc(rows)

    # ---- routes --------------------------------------------------------------------------------
    def on_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.request_latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
