"""The caption service in-process: schemas, equality with predict_batch.py, bad input, limits, auth,
health, metrics, concurrency and continuous batching (a tiny random model, real vocabulary)."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from paddle_caption.serve.engine import EngineOptions
from paddle_caption.serve.service import ServiceLimits

from .conftest import make_model_dir
from .serve_support import AppClient, b64, build, chat_body, data_url, jpeg_bytes, metric

NEW = 8  # max new tokens in most requests: random weights never stop early


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve_model"))


@pytest.fixture(scope="module")
def predictor(model_dir):
    from paddle_caption.predict.predictor import load_predictor

    return load_predictor(model_dir)


@pytest.fixture(scope="module")
def captioned(predictor):
    """Six noise images whose greedy captions (generated alone, batch of one, through the
    Predictor) all differ, so that a caption given to the wrong request cannot go unnoticed.
    A random micro model reads little of its image: about half of all noise images qualify."""
    from paddle_caption.data.images import decode_image
    from paddle_caption.decoding.config import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=NEW)
    chosen = {}
    for seed in range(60):
        img = jpeg_bytes(seed)
        caption = predictor.decode(predictor.generate_ids([predictor.preprocess(decode_image(img))], config=cfg)[0])
        chosen.setdefault(caption, img)
        if len(chosen) == 6:
            return list(chosen.values()), list(chosen)
    raise AssertionError("fewer than 6 distinct captions among 60 images")


@pytest.fixture(scope="module")
def images(captioned):
    return captioned[0]


@pytest.fixture(scope="module")
def alone(captioned):
    return captioned[1]


@pytest.fixture()
def client(predictor):
    service, metrics, app = build(predictor, ServiceLimits(max_body_bytes=1 << 20, max_image_pixels=200 * 200,
                                                           max_images_per_request=3, max_tokens_cap=64,
                                                           default_max_tokens=16, max_num_beams=3))
    with AppClient(app) as c:
        c.service = service
        yield c


class Gate:
    """Hold the engine before each decode step until the test lets it take `n` more."""

    def __init__(self, engine):
        self.engine, self.allowed, self.cv = engine, 0, threading.Condition()
        original = engine._step

        def gated_step():
            with self.cv:
                self.cv.wait_for(lambda: self.allowed > 0 or self.opened)
                self.allowed -= 1
            original()

        self.opened = False
        engine._step = gated_step

    def release(self, n: int = 1):
        with self.cv:
            self.allowed += n
            self.cv.notify_all()

    def open(self):
        with self.cv:
            self.opened = True
            self.cv.notify_all()


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def assert_error(response, status: int, *words: str):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and isinstance(error["message"], str)
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert "Traceback" not in response.text
    return error


# ------------------------------------------------------------------------------------ schemas
def test_chat_completion_is_a_standard_response_with_usage(client, predictor, images, alone):
    from paddle_caption.data.samples import build_prompt_ids

    r = client.post("/v1/chat/completions", json=chat_body(images[0], max_tokens=NEW))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "micro" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == alone[0]
    assert choice["finish_reason"] == "length"  # random weights: the cap, not a stop token
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(build_prompt_ids(predictor.tokenizer, predictor.template))
    assert usage["completion_tokens"] == NEW
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # max_completion_tokens is OpenAI's newer name; a user text replaces the training instruction
    r = client.post("/v1/chat/completions", json=chat_body(images[0], "Describe it.", max_completion_tokens=3,
                                                           model="micro"))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert r.json()["usage"]["prompt_tokens"] < usage["prompt_tokens"]


def test_captions_accept_json_single_json_list_and_multipart(client, images, alone):
    r = client.post("/v1/captions", json={"image": b64(images[0]), "id": "first", "max_new_tokens": NEW})
    assert r.status_code == 200, r.text
    (item,) = r.json()
    assert item["id"] == "first" and item["caption"] == alone[0] and item["tokens"] == NEW
    assert item["latency_ms"] > 0
    r = client.post("/v1/captions", json={"images": [b64(images[1]), {"id": "x", "image": data_url(images[2])}],
                                          "max_new_tokens": NEW})
    assert [(i["id"], i["caption"]) for i in r.json()] == [("0", alone[1]), ("x", alone[2])]
    r = client.post("/v1/captions", files=[("image", ("a.jpg", images[3], "image/jpeg")),
                                           ("image", ("b.jpg", images[4], "image/jpeg"))],
                    data={"max_new_tokens": str(NEW)})
    assert r.status_code == 200, r.text
    assert [(i["id"], i["caption"], i["tokens"]) for i in r.json()] == [("a.jpg", alone[3], NEW), ("b.jpg", alone[4], NEW)]


def test_models_health_metrics_and_the_page(client, images):
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["micro"] and r.json()["object"] == "list"
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    client.post("/v1/captions", json={"image": b64(images[0]), "max_new_tokens": 2})
    client.post("/v1/captions", json={})
    text = client.get("/metrics").text
    assert metric(text, "paddle_caption_requests_total", endpoint="/v1/captions", status="200") == 1
    assert metric(text, "paddle_caption_requests_total", endpoint="/v1/captions", status="400") == 1
    assert metric(text, "paddle_caption_generated_tokens_total") == 2
    assert metric(text, "paddle_caption_decode_batch_size_count") >= 1
    assert metric(text, "paddle_caption_prefill_batch_size_count") == 1
    assert metric(text, "paddle_caption_engine_alive") == 1
    assert metric(text, "paddle_caption_request_latency_seconds_count", endpoint="/v1/captions") == 2
    for name in ("paddle_caption_queue_depth", "paddle_caption_running_rows", "paddle_caption_tokens_per_second",
                 "paddle_caption_image_latency_seconds_bucket", "paddle_caption_queue_wait_seconds_bucket"):
        assert name in text
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    font = client.get("/fonts/cjk.ttf")
    assert font.status_code == 200 and font.content[:4] in (b"\x00\x01\x00\x00", b"true", b"OTTO")
    examples = client.get("/examples").json()
    assert len(examples) == 6 and all("风格" in e["reference"] for e in examples)
    jpeg = client.get(examples[0]["url"])
    assert jpeg.status_code == 200 and jpeg.content[:2] == b"\xff\xd8"


def test_beam_and_sampling_options(client, predictor, images):
    from paddle_caption.data.images import decode_image
    from paddle_caption.decoding.config import GenerationConfig

    pixels = [predictor.preprocess(decode_image(images[0]))]
    beam = predictor.decode(predictor.generate_ids(pixels, config=GenerationConfig(max_new_tokens=NEW, num_beams=3))[0])
    r = client.post("/v1/captions", json={"image": b64(images[0]), "max_new_tokens": NEW, "num_beams": 3})
    assert r.status_code == 200 and r.json()[0]["caption"] == beam
    r = client.post("/v1/chat/completions", json=chat_body(images[0], max_tokens=NEW, num_beams=3))
    assert r.json()["choices"][0]["message"]["content"] == beam
    sampled = [client.post("/v1/chat/completions", json=chat_body(images[0], max_tokens=NEW, temperature=1.5, seed=s))
               .json()["choices"][0]["message"]["content"] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    form = client.post("/v1/captions", files=[("image", ("a.jpg", images[0], "image/jpeg"))],
                       data={"max_new_tokens": str(NEW), "do_sample": "true", "seed": "1", "temperature": "1.5"})
    again = client.post("/v1/captions", json={"image": b64(images[0]), "max_new_tokens": NEW, "do_sample": True,
                                              "seed": 1, "temperature": 1.5})
    assert form.json()[0]["caption"] == again.json()[0]["caption"]


# ------------------------------------------------------------------------------------ equality with predict_batch.py
def test_greedy_captions_equal_predict_batch(tmp_path, model_dir, predictor, images):
    """predict_batch.py's own code path (predict_file: TSV in, RESULTS.txt out) and the service,
    under concurrent requests that share batches, give the same caption for every image."""
    import httpx

    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.predict import run as P

    tsv = tmp_path / "test.tsv"
    tsv.write_text("".join(f"img_{i}\t{b64(img)}\n" for i, img in enumerate(images)), encoding="utf-8")
    P.predict_file(tsv, tmp_path / "results.txt", model_dir,
                   P.PredictOptions(batch_size=4, generation=GenerationConfig(max_new_tokens=NEW), progress=False))
    expected = [line.split("\t")[1] for line in (tmp_path / "results.txt").read_text(encoding="utf-8").splitlines()]
    assert len(set(expected)) == len(images)

    service, _, app = build(predictor, engine_options=EngineOptions(max_batch_size=4, max_wait_ms=5))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            single = [c.post("/v1/captions", json={"image": b64(img), "max_new_tokens": NEW}) for img in images]
            chat = [c.post("/v1/chat/completions", json=chat_body(img, max_tokens=NEW)) for img in images]
            listed = c.post("/v1/captions", json={"images": [b64(img) for img in images], "max_new_tokens": NEW})
            return await asyncio.gather(*single, *chat, listed)

    service.engine.start()
    try:
        responses = asyncio.run(scenario())
    finally:
        service.engine.stop(10)
    assert all(r.status_code == 200 for r in responses)
    n = len(images)
    assert [r.json()[0]["caption"] for r in responses[:n]] == expected
    assert [r.json()["choices"][0]["message"]["content"] for r in responses[n:2 * n]] == expected
    assert [item["caption"] for item in responses[-1].json()] == expected


# ------------------------------------------------------------------------------------ bad input
BAD_INPUTS = [
    ("malformed JSON", "/v1/chat/completions", {"content": b'{"messages": [', "headers": {"content-type": "application/json"}},
     400, ["not valid JSON"]),
    ("empty body", "/v1/captions", {"content": b"", "headers": {"content-type": "application/json"}}, 400, ["empty"]),
    ("not an object", "/v1/captions", {"json": [1, 2]}, 400, ["JSON object"]),
    ("no image", "/v1/captions", {"json": {"max_new_tokens": 3}}, 400, ["'image'", "'images'"]),
    ("bad base64", "/v1/captions", {"json": {"image": "abc$"}}, 400, ["image", "base64"]),
    ("undecodable image", "/v1/captions", {"json": {"images": [b64(b"<html>no image</html>")]}}, 400,
     ["images.0", "not a decodable image"]),
    ("tiny image", "/v1/captions", {"json": {"image": b64(jpeg_bytes(0, (8, 8)))}}, 400, ["too small", "--min_image_side"]),
    ("text-only chat", "/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hello"}]}}, 400,
     ["text-only", "image_url"]),
    ("remote URL", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.jpg"}}]}]}},
     400, ["only data: URLs", "does not fetch"]),
    ("non-image data URL", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}]}},
     400, ["not an image"]),
    ("missing image_url", "/v1/chat/completions",
     {"json": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}, 400, ["messages.0.content.0.image_url", "required"]),
    ("unknown field (chat)", "/v1/chat/completions", {"json": {**chat_body(jpeg_bytes(0)), "temprature": 0.5}}, 400,
     ["unknown field 'temprature'"]),
    ("unknown field (captions)", "/v1/captions", {"json": {"image": b64(jpeg_bytes(0)), "beams": 2}}, 400,
     ["unknown field 'beams'"]),
    ("unknown form field", "/v1/captions", {"files": [("image", ("a.jpg", jpeg_bytes(0), "image/jpeg"))], "data": {"beams": "2"}},
     400, ["unknown field 'beams'"]),
    ("image as form text", "/v1/captions", {"data": {"image": "abc"}, "files": [("other", ("a.jpg", b"x", "image/jpeg"))]},
     400, ["file"]),
    ("wrong content type (chat)", "/v1/chat/completions", {"content": b"hi", "headers": {"content-type": "text/plain"}},
     415, ["application/json"]),
    ("wrong content type (captions)", "/v1/captions", {"content": b"hi", "headers": {"content-type": "image/jpeg"}},
     415, ["multipart/form-data"]),
    ("assistant turn", "/v1/chat/completions",
     {"json": {"messages": [{"role": "assistant", "content": "x"}, chat_body(jpeg_bytes(0))["messages"][0]]}}, 400, ["assistant"]),
    ("two greedy choices", "/v1/chat/completions", {"json": chat_body(jpeg_bytes(0), n=2)}, 400,
     ["n=2 needs sampling"]),
    ("stream options without stream", "/v1/chat/completions",
     {"json": chat_body(jpeg_bytes(0), stream_options={"include_usage": True})}, 400, ["stream=true"]),
    ("top_logprobs without logprobs", "/v1/chat/completions", {"json": chat_body(jpeg_bytes(0), top_logprobs=2)},
     400, ["top_logprobs needs logprobs"]),
    ("beam + sampling", "/v1/captions", {"json": {"image": b64(jpeg_bytes(0)), "num_beams": 2, "do_sample": True}}, 400,
     ["beam"]),
    ("bad option type", "/v1/captions", {"json": {"image": b64(jpeg_bytes(0)), "max_new_tokens": "many"}}, 400,
     ["max_new_tokens"]),
    ("unknown model", "/v1/chat/completions", {"json": chat_body(jpeg_bytes(0), model="gpt-4o")}, 404, ["gpt-4o", "micro"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_4xx_that_names_the_problem(client, images, alone, case):
    _, path, kwargs, status, words = case
    assert_error(client.post(path, **kwargs), status, *words)
    r = client.post("/v1/captions", json={"image": b64(images[0]), "max_new_tokens": NEW})  # still serving
    assert r.status_code == 200 and r.json()[0]["caption"] == alone[0]


def test_unknown_routes_and_methods_are_json_errors(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)


# ------------------------------------------------------------------------------------ limits
def test_each_limit_has_its_status(client, images):
    big = {"image": "A" * (1 << 20)}
    assert_error(client.post("/v1/captions", json=big), 413, "--max_body_mb")

    async def chunks():  # no Content-Length: the limit is enforced while the body streams
        yield b'{"image": "'
        for _ in range(40):
            yield b"A" * 32768
        yield b'"}'

    assert_error(client.post("/v1/captions", content=chunks(), headers={"content-type": "application/json"}), 413,
                 "--max_body_mb")
    assert_error(client.post("/v1/captions", json={"image": b64(jpeg_bytes(1, (300, 200)))}), 413,
                 "300x200", "--max_image_pixels")
    assert_error(client.post("/v1/captions", json={"images": [b64(img) for img in images[:4]]}), 413,
                 "4 images", "--max_images_per_request")
    files = [("image", (f"{i}.jpg", img, "image/jpeg")) for i, img in enumerate(images[:4])]
    assert_error(client.post("/v1/captions", files=files), 413, "--max_images_per_request")
    many = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}}
                                                      for img in images[:4]]}]}
    assert_error(client.post("/v1/chat/completions", json=many), 413, "--max_images_per_request")
    assert_error(client.post("/v1/chat/completions", json=chat_body(images[0], max_tokens=65)), 400,
                 "max_tokens 65", "--max_tokens_cap")
    assert_error(client.post("/v1/captions", json={"image": b64(images[0]), "num_beams": 4}), 400, "--max_num_beams")
    # a multi-image chat within the limit works: one prompt, one <img> span per image
    two = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}}
                                                     for img in images[:2]]}], "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=two).status_code == 200


def test_full_queue_is_503_with_retry_after_and_timeouts_are_504(predictor, images):
    service, metrics, app = build(predictor, ServiceLimits(request_timeout_s=1.0),
                                  EngineOptions(max_batch_size=1, max_wait_ms=0, max_queue=1))
    gate = Gate(service.engine)
    with AppClient(app) as c:
        results = {}

        def post(name, **body):
            results[name] = c.post("/v1/captions", json={"image": b64(images[0]), "max_new_tokens": 2, **body})

        first = threading.Thread(target=post, args=("first",))
        first.start()
        wait_until(lambda: service.engine.running == 1)  # prefilled; held before its first step
        second = threading.Thread(target=post, args=("second",))
        second.start()
        wait_until(lambda: service.engine.queued == 1)  # the queue (1 image) is full now
        r = c.post("/v1/captions", json={"image": b64(images[1])})
        assert_error(r, 503, "queue is full")
        assert r.headers["retry-after"] == "1"
        first.join(5)
        second.join(5)
        assert_error(results["first"], 504, "--request_timeout")
        assert_error(results["second"], 504)
        gate.open()  # the engine drops the timed-out rows at its next step and serves on
        wait_until(lambda: service.engine.running == 0 and service.engine.queued == 0)
        r = c.post("/v1/captions", json={"image": b64(images[0]), "max_new_tokens": 2})
        assert r.status_code == 200
        text = c.get("/metrics").text
        assert metric(text, "paddle_caption_cancelled_rows_total") == 2
        assert metric(text, "paddle_caption_requests_total", endpoint="/v1/captions", status="503") == 1
        assert metric(text, "paddle_caption_requests_total", endpoint="/v1/captions", status="504") == 2


# ------------------------------------------------------------------------------------ auth
def test_api_key(predictor, images):
    _, _, app = build(predictor, api_key="s3cret")
    with AppClient(app) as c:
        r = c.get("/v1/models")
        assert_error(r, 401, "Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert_error(c.post("/v1/captions", json={"image": b64(images[0])}), 401)
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/v1/captions", json={"image": b64(images[0]), "max_new_tokens": 2},
                   headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # open


# ------------------------------------------------------------------------------------ health
def test_health_is_503_when_the_engine_is_stuck_or_stopped(predictor, images):
    service, _, app = build(predictor, ServiceLimits(health_deadline_s=0.3))
    gate = Gate(service.engine)
    with AppClient(app) as c:
        assert c.get("/health").status_code == 200
        worker = threading.Thread(target=c.post, args=("/v1/captions",),
                                  kwargs={"json": {"image": b64(images[0]), "max_new_tokens": 2}})
        worker.start()
        wait_until(lambda: service.engine.running == 1)
        time.sleep(0.5)  # held in its step for longer than the deadline
        r = c.get("/health")
        assert r.status_code == 503 and "no progress" in r.json()["reason"]
        gate.open()
        worker.join(5)
        wait_until(lambda: c.get("/health").status_code == 200)
        service.engine.stop(5)
        r = c.get("/health")
        assert r.status_code == 503 and "not running" in r.json()["reason"]
        assert "engine_alive 0.0" in c.get("/metrics").text
        assert_error(c.post("/v1/captions", json={"image": b64(images[0])}), 503, "not running")


def test_a_dead_engine_thread_turns_health_503_and_requests_503(predictor, images):
    service, _, app = build(predictor)

    def broken_admit():
        raise RuntimeError("engine loop bug")

    service.engine._admit = broken_admit  # the loop itself fails: the thread ends
    with AppClient(app) as c:
        wait_until(lambda: not service.engine.alive)
        r = c.get("/health")
        assert r.status_code == 503 and "not running (RuntimeError: engine loop bug)" in r.json()["reason"]
        assert_error(c.post("/v1/captions", json={"image": b64(images[0])}), 503, "not running")


def test_a_model_failure_is_a_500_json_error_and_the_engine_serves_on(predictor, images, alone, monkeypatch):
    service, _, app = build(predictor)
    with AppClient(app) as c:
        original = service.engine._batch.decoder.model.forward
        calls = {"n": 0}

        def failing(*args, **kwargs):
            calls["n"] += 1
            raise RuntimeError("simulated kernel failure")

        monkeypatch.setattr(service.engine.model, "forward", failing)
        r = c.post("/v1/captions", json={"image": b64(images[0]), "max_new_tokens": NEW})
        assert_error(r, 500, "captioning failed", "simulated kernel failure")
        assert calls["n"] == 1
        monkeypatch.setattr(service.engine.model, "forward", original)
        r = c.post("/v1/captions", json={"image": b64(images[0]), "max_new_tokens": NEW})
        assert r.status_code == 200 and r.json()[0]["caption"] == alone[0]
        assert c.get("/health").status_code == 200


# ------------------------------------------------------------------------------------ batching
def test_concurrent_clients_are_each_answered_once(predictor, images, alone):
    """32 concurrent requests (captions and chat, one to three images each) through a batch of 4:
    every request gets its own answer, none is lost or duplicated, and batches really formed."""
    import httpx

    service, _, app = build(predictor, engine_options=EngineOptions(max_batch_size=4, max_wait_ms=2))
    rng = np.random.default_rng(0)
    plan = [(k, sorted(rng.choice(len(images), size=int(rng.integers(1, 4)), replace=False).tolist()))
            for k in range(32)]

    async def one(c, k, picks):
        if k % 2:
            r = await c.post("/v1/chat/completions", json=chat_body(images[picks[0]], max_tokens=NEW, user=f"u{k}"))
            return k, [r.json()["choices"][0]["message"]["content"]]
        r = await c.post("/v1/captions", json={"images": [{"id": f"{k}-{i}", "image": b64(images[i])} for i in picks],
                                               "max_new_tokens": NEW})
        assert [item["id"] for item in r.json()] == [f"{k}-{i}" for i in picks]
        return k, [item["caption"] for item in r.json()]

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60) as c:
            out = await asyncio.gather(*(one(c, k, picks) for k, picks in plan))
            return out, (await c.get("/metrics")).text

    service.engine.start()
    try:
        answers, text = asyncio.run(scenario())
    finally:
        service.engine.stop(10)
    assert sorted(k for k, _ in answers) == list(range(32))
    for k, captions in answers:
        picks = dict(plan)[k]
        assert captions == ([alone[picks[0]]] if k % 2 else [alone[i] for i in picks])
    images_done = sum(1 if k % 2 else len(p) for k, p in plan)
    assert metric(text, "paddle_caption_image_latency_seconds_count") == images_done
    steps = metric(text, "paddle_caption_decode_batch_size_count")
    rows = metric(text, "paddle_caption_decode_batch_size_sum")
    assert rows / steps > 2  # decode steps were shared
    assert metric(text, "paddle_caption_decode_batch_size_bucket", le="4.0") == steps  # never above the cap


def test_new_requests_join_the_running_decode_batch(predictor, images):
    """A short request arriving mid-decode joins the running batch at a step boundary, leaves when
    done, and both captions are the ones each image gets alone."""
    from paddle_caption.data.images import decode_image
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.serve.engine import Job, Sequence

    service, metrics, _ = build(predictor, engine_options=EngineOptions(max_batch_size=4, max_wait_ms=0))
    engine = service.engine
    gate = Gate(engine)
    engine.start()
    try:
        def job(i, n):
            seq = Sequence(predictor.prompt_ids, [predictor.preprocess(decode_image(images[i]))],
                           predictor.fill_stop_and_pad_ids(GenerationConfig(max_new_tokens=n)))
            return Job([seq])

        long_job, short_job = job(0, 12), job(1, 3)
        engine.submit(long_job)
        gate.release(4)
        wait_until(lambda: engine.status().steps == 4)
        engine.submit(short_job)  # the engine is held before step 5 now: the job waits for that boundary
        gate.release(1)
        wait_until(lambda: engine.running == 2)  # prefilled and merged before step 6
        gate.release(3)
        (short,) = short_job.future.result(10)
        assert not long_job.future.done() and engine.running == 1  # the short row left, the long one runs on
        gate.open()
        (long,) = long_job.future.result(10)
    finally:
        gate.open()
        engine.stop(10)
    def by_itself(i, n):
        return predictor.generate_ids([predictor.preprocess(decode_image(images[i]))],
                                      config=GenerationConfig(max_new_tokens=n))[0]

    assert long.tokens == by_itself(0, 12) and short.tokens == by_itself(1, 3)
    assert long.finish_reason == short.finish_reason == "length"
    text = metrics.render().decode()
    assert metric(text, "paddle_caption_prefill_batch_size_count") == 2
    assert metric(text, "paddle_caption_decode_batch_size_count") == 12  # one step per token of the long row
    assert metric(text, "paddle_caption_decode_batch_size_bucket", le="1.0") == 12 - 3  # 3 steps of two rows


def test_a_beam_request_joins_the_running_batch_with_one_row_per_beam(predictor, images):
    """Beam search runs in the engine's one batch: a 3-beam request arriving mid-decode takes three
    rows next to the running greedy row, and both get what they get alone (generate_ids)."""
    from paddle_caption.data.images import decode_image
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.serve.engine import Job, Sequence

    service, metrics, _ = build(predictor, engine_options=EngineOptions(max_batch_size=4, max_wait_ms=0))
    engine = service.engine
    gate = Gate(engine)
    engine.start()
    greedy_cfg, beam_cfg = GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=NEW, num_beams=3)
    pixels = [[predictor.preprocess(decode_image(images[i]))] for i in (0, 1)]
    try:
        greedy_job = Job([Sequence(predictor.prompt_ids, pixels[0], predictor.fill_stop_and_pad_ids(greedy_cfg))])
        beam_job = Job([Sequence(predictor.prompt_ids, pixels[1], predictor.fill_stop_and_pad_ids(beam_cfg))])
        engine.submit(greedy_job)
        gate.release(2)
        wait_until(lambda: engine.status().steps == 2)
        engine.submit(beam_job)
        gate.release(1)
        wait_until(lambda: engine.running == 4)  # the greedy row and three beam rows
        gate.open()
        (greedy,) = greedy_job.future.result(10)
        (beam,) = beam_job.future.result(10)
    finally:
        gate.open()
        engine.stop(10)
    assert greedy.tokens == predictor.generate_ids(pixels[0], config=greedy_cfg)[0]
    assert beam.tokens == predictor.generate_ids(pixels[1], config=beam_cfg)[0]
    assert beam.finish_reason in ("stop", "length")
    text = metrics.render().decode()
    assert metric(text, "paddle_caption_decode_batch_size_bucket", le="2.0") < metric(
        text, "paddle_caption_decode_batch_size_count")  # some steps decoded four rows


def test_a_beam_request_wider_than_max_batch_size_runs_alone(predictor, images):
    from paddle_caption.data.images import decode_image
    from paddle_caption.decoding.config import GenerationConfig

    pixels = [predictor.preprocess(decode_image(images[0]))]
    beam = predictor.decode(predictor.generate_ids(pixels, config=GenerationConfig(max_new_tokens=NEW, num_beams=3))[0])
    _, _, app = build(predictor, engine_options=EngineOptions(max_batch_size=2, max_wait_ms=0))
    with AppClient(app) as c:
        r = c.post("/v1/captions", json={"images": [b64(images[0])] * 2, "max_new_tokens": NEW, "num_beams": 3})
        assert r.status_code == 200, r.text
        assert [item["caption"] for item in r.json()] == [beam, beam]


def test_speculative_engine_answers_the_same_captions(predictor, images, alone):
    """With a drafter (here drafting from the images' own greedy ids, so drafts get accepted), the
    service's captions are the plain ones, alone and sharing batches, and /metrics counts drafts."""
    from paddle_caption.data.images import decode_image
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.datastore import DraftDatastore
    from paddle_caption.decoding.drafting import RetrievalDrafter

    tok = predictor.tokenizer
    ids = [predictor.generate_ids([predictor.preprocess(decode_image(img))], config=GenerationConfig(max_new_tokens=NEW))[0]
           for img in images]
    drafter = RetrievalDrafter(DraftDatastore.build([i + [tok.im_end_id] for i in ids[:4]]), 4, stop_ids=tok.stop_ids)
    _, metrics, app = build(predictor, drafter=drafter)
    with AppClient(app) as c:
        r = c.post("/v1/captions", json={"image": b64(images[0]), "max_new_tokens": NEW})
        assert r.status_code == 200, r.text
        assert r.json()[0]["caption"] == alone[0] and r.json()[0]["tokens"] == NEW
        r = c.post("/v1/captions", json={"images": [b64(img) for img in images], "max_new_tokens": NEW})
        assert [(i["caption"], i["tokens"]) for i in r.json()] == [(a, NEW) for a in alone]
        text = c.get("/metrics").text
    assert metric(text, "paddle_caption_draft_tokens_total", outcome="accepted") > 0
    assert metric(text, "paddle_caption_generated_tokens_total") == NEW * (1 + len(images))


def test_the_web_page_ships_as_package_data(tmp_path):
    """A non-editable install serves the page: setup.py's build copies every static file."""
    import subprocess
    import sys

    from paddle_caption.serve.app import STATIC_DIR

    from .serve_support import ROOT

    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True)
    shipped = tmp_path / "paddle_caption" / "serve" / "static"
    wanted = sorted(p.relative_to(STATIC_DIR) for p in STATIC_DIR.rglob("*") if p.is_file())
    assert {"index.html", "app.js", "style.css"} <= {str(p) for p in wanted}
    assert sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file()) == wanted
