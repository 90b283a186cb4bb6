"""Helpers for the caption-service tests: a micro model directory, services over one predictor,
real uvicorn servers on a free 127.0.0.1 port (in a thread or a subprocess), test images."""
from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


ROOT = Path(__file__).resolve().parents[1]


def jpeg_bytes(seed: int, size=(64, 48)) -> bytes:
    """A noise image: different seeds give visibly different inputs to the model."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes, media: str = "image/jpeg") -> str:
    return f"data:{media};base64,{b64(data)}"


def chat_body(image: bytes, text: str | None = None, **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": content}], **kw}


def build(predictor, limits=None, engine_options=None, api_key=None, model_name="micro", drafter=None):
    """A fresh (service, metrics, app) over an already-loaded predictor (`drafter`: speculative)."""
    from paddle_caption.serve.app import create_app
    from paddle_caption.serve.engine import CaptionEngine
    from paddle_caption.serve.telemetry import ServiceMetrics
    from paddle_caption.serve.service import CaptionService

    metrics = ServiceMetrics()
    engine = CaptionEngine(predictor if drafter is None else predictor.with_drafter(drafter), engine_options, metrics)
    service = CaptionService(predictor, engine, limits, model_name)
    return service, metrics, create_app(service, metrics, api_key=api_key, stop_timeout=10)


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text (0.0 if absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app):
    """A real uvicorn server for `app` on 127.0.0.1 (free port), in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextlib.contextmanager
def serve_in_process(model_dir: Path, *flags: str, startup_timeout: float = 120):
    """`python -m paddle_caption.serve MODEL_DIR --port P FLAGS` as a child; yields (process, url)."""
    import httpx

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server can never block on it
    proc = subprocess.Popen([sys.executable, "-m", "paddle_caption.serve", str(model_dir), "--port", str(port),
                             "--log_level", "warning", *flags], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited with {proc.returncode}: {log.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy")
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


class AppClient:
    """A synchronous client for an ASGI app served in-process, with the app's lifespan (the engine
    starts and stops as under uvicorn). The app runs on an event loop in a background thread, so
    several test threads may call the client at once and their requests really overlap."""

    def __init__(self, app):
        self.app = app

    def __enter__(self):
        import asyncio

        import httpx

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stack = contextlib.AsyncExitStack()
        self._call(self.stack.enter_async_context(self.app.router.lifespan_context(self.app)))
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test",
                                        timeout=60)
        return self

    def __exit__(self, *exc):
        self._call(self.client.aclose())
        self._call(self.stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def _call(self, coro):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def request(self, method: str, url: str, **kwargs):
        return self._call(self.client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs):
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs):
        return self.request("POST", url, **kwargs)
