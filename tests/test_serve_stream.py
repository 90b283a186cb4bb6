"""Streaming, several candidates and log-probabilities of the caption service: streamed deltas
equal the non-streamed caption (greedy, with and without speculative decoding) and never split a
character, a client that goes away mid-stream frees its row, the official `openai` client reads
the chunks, n candidates and log-probs, and every log-probability equals a teacher-forced forward
of the returned tokens within 1e-4 (a tiny random model with the real vocabulary)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from .conftest import make_model_dir
from .serve_support import AppClient, b64, build, chat_body, jpeg_bytes, metric, serve_in_thread

NEW = 8


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from paddle_caption.predict.predictor import load_predictor

    return load_predictor(make_model_dir(tmp_path_factory.mktemp("stream_model")))


@pytest.fixture(scope="module")
def image(predictor):
    return jpeg_bytes(5)


def pixels_of(predictor, image: bytes):
    from paddle_caption.data.images import decode_image

    return predictor.preprocess(decode_image(image))


def sse_events(text: str) -> list:
    """The `data:` payloads of a server-sent event stream: JSON objects, and the final "[DONE]"."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def drafter_for(predictor, ids_list):
    from paddle_caption.decoding.datastore import DraftDatastore
    from paddle_caption.decoding.drafting import RetrievalDrafter

    tok = predictor.tokenizer
    return RetrievalDrafter(DraftDatastore.build([i + [tok.im_end_id] for i in ids_list]), 4, stop_ids=tok.stop_ids)


# ------------------------------------------------------------------------------------ text deltas
def test_deltas_never_split_a_character_and_add_up_to_the_caption(predictor):
    from paddle_caption.serve.streaming import CaptionText

    tok = predictor.tokenizer
    ids = tok.encode("广告𝒜🎉 海报, a poster 𝔅")
    prefixes = [tok.decode(ids[:k]) for k in range(1, len(ids) + 1)]
    assert any(p.endswith("\ufffd") for p in prefixes), "no token ends inside a character: the test proves nothing"
    text = CaptionText(predictor.decode)
    deltas = [text.update(ids[:k], final=k == len(ids)) for k in range(1, len(ids) + 1)]
    assert "".join(deltas) == predictor.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


# ------------------------------------------------------------------------------------ log-probs
def full_forward(predictor, prompt, img, tokens, top_n):
    """The reference: one uncached forward over prompt + tokens, log-softmax at each position
    before a generated token (independent of the decoding package's cache and scoring code)."""
    import paddle

    ids = paddle.to_tensor([list(prompt) + list(tokens)])
    width = len(prompt) + len(tokens)
    with paddle.no_grad():
        logits = predictor.model(ids, images=predictor.pixels([img]), attention_mask=paddle.ones([1, width], "int64"),
                                 logits_index=list(range(len(prompt) - 1, width - 1))).logits.numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    values = [float(logp[k, t]) for k, t in enumerate(tokens)]
    tops = [list(np.argsort(-row, kind="stable")[:top_n]) for row in logp]
    return values, tops, logp


def test_logprobs_equal_a_teacher_forced_forward(predictor, image):
    """Greedy, sampling with processors (the raw distribution is reported), greedy with a
    repetition penalty, speculative greedy and the n best beams, all sharing one batch."""
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.logprobs import teacher_forced
    from paddle_caption.serve.engine import CaptionEngine, Job, Sequence

    img = pixels_of(predictor, image)
    prompt = predictor.prompt_ids
    greedy_ids = predictor.generate_ids([img], config=GenerationConfig(max_new_tokens=NEW))[0]
    configs = [GenerationConfig(max_new_tokens=NEW, logprobs=True, top_logprobs=3),
               GenerationConfig(max_new_tokens=NEW, do_sample=True, temperature=1.7, top_k=40, top_p=0.9,
                                repetition_penalty=1.3, seed=7, logprobs=True, top_logprobs=2),
               GenerationConfig(max_new_tokens=NEW, repetition_penalty=1.5, logprobs=True),
               GenerationConfig(max_new_tokens=NEW, num_beams=3, num_return_sequences=2, logprobs=True)]
    for drafter in (None, drafter_for(predictor, [greedy_ids])):
        engine = CaptionEngine(predictor if drafter is None else predictor.with_drafter(drafter))
        engine.start()
        try:
            jobs = [Job([Sequence(prompt, [img], predictor.fill_stop_and_pad_ids(cfg))]) for cfg in configs]
            for job in jobs:
                engine.submit(job)
            done = [job.future.result(timeout=60)[0] for job in jobs]
        finally:
            engine.stop(10)
        if drafter is not None:
            assert engine.speculation.accepted > 0
        assert done[0].tokens == greedy_ids and len(done[3].candidates) == 2
        for seq in done:
            for tokens, entries in zip(seq.candidates, seq.logprobs):
                assert [e.token for e in entries] == tokens and tokens
                want, tops, logp = full_forward(predictor, prompt, img, tokens, seq.config.top_logprobs)
                np.testing.assert_allclose([e.logprob for e in entries], want, atol=1e-4, rtol=0)
                for k, e in enumerate(entries):
                    assert [t for t, _ in e.top] == tops[k]
                    np.testing.assert_allclose([v for _, v in e.top], logp[k, tops[k]], atol=1e-4, rtol=0)
        # the library's teacher-forced scoring (beams, predict_batch.py --scores) agrees too
        (forced,) = teacher_forced(predictor.model, [prompt], predictor.pixels([img]), [done[1].tokens],
                                   predictor.tokenizer.pad_id, 2)
        np.testing.assert_allclose([e.logprob for e in forced], [e.logprob for e in done[1].logprobs[0]], atol=1e-4)
        # greedy without processors picks the most likely token: it is its own top-1
        assert all(e.top[0][0] == e.token for e in done[0].logprobs[0])


# ------------------------------------------------------------------------------------ HTTP streams
def test_chat_stream_equals_the_plain_answer_with_and_without_speculation(predictor, image):
    img = pixels_of(predictor, image)
    from paddle_caption.decoding.config import GenerationConfig

    greedy_ids = predictor.generate_ids([img], config=GenerationConfig(max_new_tokens=NEW))[0]
    for drafter in (None, drafter_for(predictor, [greedy_ids])):
        _, metrics, app = build(predictor, drafter=drafter)
        with AppClient(app) as c:
            body = chat_body(image, max_tokens=NEW, logprobs=True, top_logprobs=2)
            plain = c.post("/v1/chat/completions", json=body).json()
            r = c.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.text)
            text = c.get("/metrics").text
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(e["object"] == "chat.completion.chunk" and e["id"] == chunks[0]["id"] for e in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all("usage" in e for e in chunks) and all(e["usage"] is None for e in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
        content = [e["choices"][0] for e in chunks[1:-1]]
        assert "".join(ch["delta"].get("content", "") for ch in content) == plain["choices"][0]["message"]["content"]
        assert [ch["finish_reason"] for ch in content][-1] == "length"
        streamed_lp = [t for ch in content if ch["logprobs"] for t in ch["logprobs"]["content"]]
        assert streamed_lp == plain["choices"][0]["logprobs"]["content"]
        if drafter is not None:  # some delta carried several tokens
            assert metric(text, "paddle_caption_draft_tokens_total", outcome="accepted") > 0
            assert max(len(ch["logprobs"]["content"]) for ch in content if ch["logprobs"]) > 1


def test_captions_stream_json_lines_and_mean_logprob(predictor, image):
    _, _, app = build(predictor)
    with AppClient(app) as c:
        images = [b64(image), b64(jpeg_bytes(9))]
        plain = c.post("/v1/captions", json={"images": images, "max_new_tokens": NEW}).json()
        r = c.post("/v1/captions", json={"images": images, "max_new_tokens": NEW, "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.text.splitlines()]
        beam = c.post("/v1/captions", files={"image": ("a.jpg", image, "image/jpeg")},
                      data={"max_new_tokens": str(NEW), "num_beams": "3", "stream": "true"})
        beam_lines = [json.loads(line) for line in beam.text.splitlines()]
    for k, result in enumerate(plain):
        assert "".join(e["delta"] for e in lines if e.get("index") == k and "delta" in e) == result["caption"]
        (final,) = [e["result"] for e in lines if e.get("index") == k and "result" in e]
        assert final["caption"] == result["caption"] and final["tokens"] == NEW
        assert result["mean_logprob"] < 0 and final["mean_logprob"] == pytest.approx(result["mean_logprob"], abs=1e-4)
    assert beam_lines[-1]["result"]["mean_logprob"] < 0
    assert "".join(e.get("delta", "") for e in beam_lines) == beam_lines[-1]["result"]["caption"]


def test_n_candidates_sampled_and_beams(predictor, image):
    _, _, app = build(predictor)
    with AppClient(app) as c:
        one = c.post("/v1/chat/completions", json=chat_body(image, max_tokens=NEW, temperature=1.0, seed=3)).json()
        three = c.post("/v1/chat/completions", json=chat_body(image, max_tokens=NEW, temperature=1.0, seed=3, n=3,
                                                             logprobs=True)).json()
        beams = c.post("/v1/chat/completions", json=chat_body(image, max_tokens=NEW, num_beams=3, n=2)).json()
        best = c.post("/v1/chat/completions", json=chat_body(image, max_tokens=NEW, num_beams=3)).json()
        too_many = c.post("/v1/chat/completions", json=chat_body(image, temperature=1.0, n=9))
    assert [ch["index"] for ch in three["choices"]] == [0, 1, 2]
    assert three["choices"][0]["message"] == one["choices"][0]["message"]  # candidate k samples with seed + k
    assert len({ch["message"]["content"] for ch in three["choices"]}) > 1
    assert all(len(ch["logprobs"]["content"]) == NEW for ch in three["choices"])
    assert three["usage"]["completion_tokens"] == 3 * NEW
    assert len(beams["choices"]) == 2 and beams["choices"][0]["message"] == best["choices"][0]["message"]
    assert beams["choices"][0]["message"] != beams["choices"][1]["message"]
    assert too_many.status_code == 400 and "--max_n" in too_many.json()["error"]["message"]


# ------------------------------------------------------------------------------------ real sockets
@pytest.mark.slow
def test_openai_client_streams_and_reads_candidates_and_a_disconnect_frees_the_row(predictor, image):
    import httpx
    import openai

    service, metrics, app = build(predictor)
    engine = service.engine
    original = engine._step

    def slow_step():  # ~25 steps a second: a long caption is still running when the client leaves
        time.sleep(0.04)
        original()

    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        message = chat_body(image)["messages"]
        plain = client.chat.completions.create(model="micro", messages=message, max_tokens=NEW)
        chunks = list(client.chat.completions.create(model="micro", messages=message, max_tokens=NEW, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
            plain.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == NEW
        sampled = client.chat.completions.create(model="micro", messages=message, max_tokens=NEW, n=3,
                                                 temperature=1.0, seed=1, logprobs=True, top_logprobs=2)
        assert len(sampled.choices) == 3
        for choice in sampled.choices:
            content = choice.logprobs.content
            assert len(content) == NEW and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
            assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)

        engine._step = slow_step
        body = chat_body(image, max_tokens=60, stream=True)
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                seen = 0
                for line in lines:
                    if line.startswith("data: ") and '"content"' in line:
                        seen += 1
                        if seen == 3:
                            break  # leave mid-caption: the response closes, the connection drops
            deadline = time.monotonic() + 10
            while metric(http.get("/metrics").text, "paddle_caption_cancelled_rows_total") < 1:
                assert time.monotonic() < deadline, "the row of the client that left was not dropped"
                time.sleep(0.05)
            assert engine.running == 0
            tokens = metric(http.get("/metrics").text, "paddle_caption_generated_tokens_total")
        assert tokens < 5 * NEW + 60  # 5 earlier captions of NEW tokens; the abandoned one stopped before its 60
