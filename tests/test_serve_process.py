"""The caption service over real HTTP: a client that disconnects frees its slot; SIGTERM stops
accepting, finishes the request in flight and exits 0; the CLI's errors are one line."""
from __future__ import annotations

import signal
import socket
import threading
import time

import httpx
import pytest

from paddle_caption.runtime import run_cli
from paddle_caption.serve.engine import EngineOptions
from paddle_caption.serve.service import ServiceLimits

from .conftest import make_model_dir
from .serve_support import b64, build, jpeg_bytes, metric, serve_in_process, serve_in_thread

LONG = 1500  # tokens: seconds of decoding for the micro model (random weights never stop)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve_process_model"))


def wait_until(condition, timeout=30.0, every=0.01):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every)


def raw_post(url: str, path: str, body: bytes) -> socket.socket:
    """Send a JSON POST on a raw socket and return the socket without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_a_client_that_disconnects_frees_its_slot(model_dir):
    import json

    from paddle_caption.predict.predictor import load_predictor

    service, metrics, app = build(load_predictor(model_dir), ServiceLimits(max_tokens_cap=LONG),
                                  EngineOptions(max_batch_size=1, max_wait_ms=0))
    engine = service.engine
    image = b64(jpeg_bytes(0))
    with serve_in_thread(app) as url:
        sock = raw_post(url, "/v1/captions", json.dumps({"image": image, "max_new_tokens": LONG}).encode())
        wait_until(lambda: engine.running == 1 and engine.status().steps > 0)
        sock.close()  # the client goes away mid-decode
        wait_until(lambda: engine.running == 0)
        assert engine.status().steps < LONG  # dropped long before its last token, not finished
        assert metric(metrics.render().decode(), "paddle_caption_cancelled_rows_total") == 1
        # the only slot (max_batch_size 1) is free: the next request is served
        r = httpx.post(url + "/v1/captions", json={"image": image, "max_new_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()[0]["tokens"] == 4
        text = httpx.get(url + "/metrics").text
        assert metric(text, "paddle_caption_requests_total", endpoint="/v1/captions", status="499") == 1


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_stops_accepting_and_exits_0(model_dir):
    with serve_in_process(model_dir, "--max_tokens_cap", str(LONG)) as (proc, url):
        result = {}

        def long_request():
            result["response"] = httpx.post(url + "/v1/captions", timeout=120,
                                            json={"image": b64(jpeg_bytes(0)), "max_new_tokens": LONG})

        client = threading.Thread(target=long_request)
        client.start()
        wait_until(lambda: httpx.get(url + "/health", timeout=5).json()["running"] == 1, every=0.05)
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                httpx.get(url + "/health", timeout=2)
            except httpx.ConnectError:
                return True
            return False

        wait_until(refused, timeout=10, every=0.05)
        assert client.is_alive()  # new connections are refused while the old request still decodes
        client.join(120)
        response = result["response"]
        assert response.status_code == 200 and response.json()[0]["tokens"] == LONG
        assert proc.wait(60) == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    from paddle_caption.serve.cli import main

    assert run_cli(main, [str(tmp_path / "missing")]) == 2
    assert "error: model directory not found" in capsys.readouterr().err
    assert run_cli(main, [str(tmp_path), "--max_batch_size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    assert run_cli(main, [str(tmp_path), "--default_max_tokens", "600"]) == 2
    assert "exceeds max_tokens_cap" in capsys.readouterr().err
    assert run_cli(main, [str(tmp_path), "--dtype", "bfloat16"]) == 2  # refused before any load
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dtype bfloat16: " in err and "on CPU use float32" in err, err
