"""The exported deployment path (paddle_caption/deploy): graphs traced from the model, run by Paddle
Inference, give the eager model's logits, caches and captions, under the unchanged decoding code."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import paddle
import pytest

from paddle_caption.runtime import UserError, run_cli

from .conftest import make_model_dir, random_image_prompts
from .test_predict import good_rows, quiet, read_results, write_tsv
from .test_speculative import ScriptedDrafter, config, run_batch

TOL = 1e-4
SHAPES = ((3, 5), (1, 2), (6, 0), (0, 9))  # text around each image span: rows of different lengths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model directory, its float32 export, the eager model, the engine)."""
    from paddle_caption.deploy.engine import InferenceEngine
    from paddle_caption.deploy.export import export_model
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    root = tmp_path_factory.mktemp("deploy")
    model_dir = make_model_dir(root)
    export_model(model_dir, root / "export", "float32")
    return model_dir, root / "export", MgenVLForCausalLM.from_pretrained(model_dir), InferenceEngine(root / "export")


def prompts_and_images(cfg, seed=0, shapes=SHAPES):
    return random_image_prompts(cfg, np.random.default_rng(seed), shapes)


def both(model, engine, *args, **kwargs):
    with paddle.no_grad():
        return model(*args, **kwargs), engine(*args, **kwargs)


def assert_close(a, b):
    a, b = np.asarray(a.numpy() if hasattr(a, "numpy") else a), np.asarray(b.numpy() if hasattr(b, "numpy") else b)
    assert a.shape == b.shape
    assert np.abs(a - b).max() < TOL


@pytest.mark.parametrize("queries", [7, 3, 1], ids=["prefill", "verify_step", "decode_step"])
def test_mask_bias_built_in_numpy_equals_the_eager_models_attention_bias(queries):
    """The engine feeds the graphs the additive mask (engine.mask_bias): the eager model's values exactly."""
    from paddle_caption.deploy.engine import mask_bias
    from paddle_caption.model.qwen import attention_bias

    mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]], np.int64)
    total = mask.shape[1]
    q_abs = paddle.to_tensor(np.tile(np.arange(total - queries, total), (len(mask), 1)))
    want = attention_bias(q_abs, total, paddle.to_tensor(mask)).numpy()
    got = mask_bias(mask, queries)
    assert got.shape == want.shape == (3, 1, queries, total) and got.dtype == np.float32
    assert np.array_equal(got, want)


@pytest.mark.parametrize("shapes", [((4, 4), (4, 4)), SHAPES], ids=["equal_length", "left_padded"])
def test_prefill_and_decode_logits_and_cache_match_dygraph(exported, shapes):
    from paddle_caption.decoding.batch import left_pad

    _, _, model, engine = exported
    prompts, images = prompts_and_images(model.config, shapes=shapes)
    ids, mask = left_pad(prompts, 0)
    ids, mask = paddle.to_tensor(ids), paddle.to_tensor(mask)
    want, got = both(model, engine, ids, images=images, attention_mask=mask, use_cache=True, last_logits_only=True)
    assert_close(want.logits, got.logits)
    for (wk, wv), (gk, gv) in zip(want.past_key_values, got.past_key_values):
        assert_close(wk, gk)
        assert_close(wv, gv)
    # one token per row, then a 3-token verify step with flat logits_index (speculative decoding)
    rows = len(prompts)
    for fed, index in ((1, None), (3, np.arange(rows * 3)[::2])):
        tokens = paddle.to_tensor(np.arange(rows * fed, dtype=np.int64).reshape(rows, fed) + 7)
        mask = paddle.concat([mask, paddle.ones([rows, fed], dtype="int64")], axis=1)
        want_step, got_step = both(model, engine, tokens, attention_mask=mask, past_key_values=want.past_key_values,
                                   use_cache=True, logits_index=index)
        assert_close(want_step.logits, got_step.logits)
        assert_close(want_step.past_key_values[-1][0], got_step.past_key_values[-1][0])
        want = want_step


def test_greedy_captions_batched_one_by_one_and_speculative_equal_dygraph(exported):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.generate import generate

    _, _, model, engine = exported
    prompts, images = prompts_and_images(model.config, seed=1)
    cfg = GenerationConfig(max_new_tokens=8, stop_ids=(), pad_id=0)
    want = generate(model, prompts, images, cfg)
    assert generate(engine, prompts, images, cfg) == want
    assert [generate(engine, [p], images[i:i + 1], cfg)[0] for i, p in enumerate(prompts)] == want

    # speculative: drafts with a wrong token at a position that varies by row and step, so rows
    # keep different numbers of fed tokens (holes, rollback) through the decode graph
    answers = dict(enumerate(want))
    drafter = ScriptedDrafter(answers, 4, wrong_at=lambda step, row: (step + row) % 5)
    got, _, stats = run_batch(engine, prompts, images, [config(max_new_tokens=8)] * len(prompts), drafter)
    assert got == want
    assert 0 < stats.accepted < stats.drafted


def test_logprobs_of_the_exported_engine_equal_dygraph(exported):
    """Log-probabilities (the service's logprobs/top_logprobs) on the exported engine: a
    LogprobRecorder watching the continuous batch (plain steps, and speculative steps whose kept
    drafts are scored from the verify forward), and the teacher-forced scoring of beam candidates,
    equal the eager model's within TOL."""
    from paddle_caption.decoding.logprobs import LogprobRecorder, teacher_forced
    from paddle_caption.decoding.scheduler import ContinuousBatch

    _, _, model, engine = exported
    prompts, images = prompts_and_images(model.config, seed=3)

    def recorded(m, drafter=None):
        batch = ContinuousBatch(m, pad_id=0, drafter=drafter)
        batch.observer = recorder = LogprobRecorder()
        cfgs = [config(max_new_tokens=8, logprobs=True, top_logprobs=2)] * len(prompts)
        rows = batch.add(prompts, images, cfgs, tags=list(range(len(prompts))))
        entries = {}
        while batch:
            batch.step()
            for row in rows:
                entries[row.tag] = list(recorder.collect(row))
        return [row.tokens for row in rows], [entries[i] for i in range(len(rows))]

    def assert_entries_close(got, want):
        assert [[e.token for e in row] for row in got] == [[e.token for e in row] for row in want]
        assert [[[t for t, _ in e.top] for e in row] for row in got] == [[[t for t, _ in e.top] for e in row] for row in want]
        assert_close([e.logprob for row in got for e in row], [e.logprob for row in want for e in row])
        assert_close([lp for row in got for e in row for _, lp in e.top],
                     [lp for row in want for e in row for _, lp in e.top])

    with paddle.no_grad():
        want_tokens, want = recorded(model)
        got_tokens, got = recorded(engine)
        assert got_tokens == want_tokens and all(len(row) == 8 for row in got)
        assert_entries_close(got, want)
        drafter = ScriptedDrafter(dict(enumerate(want_tokens)), 3, wrong_at=lambda step, row: (step + row) % 4)
        spec_tokens, spec = recorded(engine, drafter)
        assert spec_tokens == want_tokens
        assert_entries_close(spec, want)
        assert_entries_close(teacher_forced(engine, prompts, images, want_tokens, 0, 2),
                             teacher_forced(model, prompts, images, want_tokens, 0, 2))
        assert_entries_close(teacher_forced(engine, prompts, images, want_tokens, 0, 2), want)


def test_predict_batch_with_the_inference_engine_writes_the_dygraph_results(exported, tmp_path, capsys):
    from paddle_caption.predict import cli, run

    model_dir, export_dir, _, _ = exported
    tsv = write_tsv(tmp_path / "test.tsv", good_rows(5))
    run.predict_file(tsv, tmp_path / "eager.txt", model_dir, quiet(batch_size=2))
    argv = [str(tsv), str(tmp_path / "exported.txt"), str(export_dir), "--max_new_tokens", "6", "--batch_size", "3",
            "--no_progress"]  # no --engine: an exported directory means inference
    assert run_cli(cli.main, argv) == 0
    assert read_results(tmp_path / "exported.txt") == read_results(tmp_path / "eager.txt")
    capsys.readouterr()
    assert run_cli(cli.main, argv[:3] + ["--engine", "dygraph", "--no_progress"]) == 2
    assert run_cli(cli.main, [str(tsv), str(tmp_path / "x.txt"), str(model_dir), "--engine", "inference"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "exported directory" in errors[0] and "tools/export_model.py" in errors[1]


def test_a_cache_longer_than_seq_length_is_refused_in_one_line(exported):
    from paddle_caption.deploy.engine import SequenceTooLong

    _, _, model, engine = exported
    n = model.config.seq_length + 1
    with pytest.raises(SequenceTooLong) as err:
        engine(paddle.zeros([1, n], dtype="int64"), use_cache=True, last_logits_only=True)
    message = str(err.value)
    assert "\n" not in message and f"limit of {model.config.seq_length}" in message


def test_text_only_prefill_matches_dygraph(exported):
    _, _, model, engine = exported
    ids = paddle.to_tensor(np.array([[5, 6, 7, 8], [0, 9, 10, 11]], dtype=np.int64))
    mask = paddle.to_tensor(np.array([[1, 1, 1, 1], [0, 1, 1, 1]], dtype=np.int64))
    want, got = both(model, engine, ids, attention_mask=mask, use_cache=True, last_logits_only=True)
    assert_close(want.logits, got.logits)


def test_export_directory_is_self_contained(exported):
    """manifest, tokenizer, config; and the graphs run with Paddle Inference alone (no kit import)."""
    _, export_dir, model, engine = exported
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["precision"] == "float32" and manifest["paddle_version"] == paddle.__version__
    assert set(manifest["graphs"]) == {"vision", "prefill", "decode"}
    assert manifest["max_total_tokens"] == model.config.seq_length
    for name in ("config.json", "qwen.tiktoken", "vision.json", "vision.pdiparams", "decode.pdiparams", "lm_head.npy"):
        assert (export_dir / name).is_file(), name
    size = model.config.visual.image_size
    script = (
        "import sys, numpy as np\n"
        "from paddle import inference\n"
        f"c = inference.Config(r'{export_dir}/vision.json', r'{export_dir}/vision.pdiparams')\n"
        "c.disable_gpu(); c.delete_pass('constant_folding_pass'); p = inference.create_predictor(c)\n"
        f"x = np.random.default_rng(0).standard_normal((2, 3, {size}, {size})).astype('float32')\n"
        "h = p.get_input_handle(p.get_input_names()[0]); h.reshape(list(x.shape)); h.copy_from_cpu(x); p.run()\n"
        "y = p.get_output_handle(p.get_output_names()[0]).copy_to_cpu()\n"
        "assert 'paddle_caption' not in sys.modules\n"
        "np.save(sys.argv[1], y)\n")
    out = export_dir.parent / "alone.npy"
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, capture_output=True, cwd="/")
    images = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype("float32")
    with paddle.no_grad():
        assert_close(model.visual(paddle.to_tensor(images)), np.load(out))


def test_bfloat16_export_is_refused_on_a_cpu_without_avx512_bf16(exported, tmp_path, monkeypatch):
    from paddle_caption.deploy import cpu_features
    from paddle_caption.deploy.export import export_model

    model_dir = exported[0]
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: {"avx2", "avx512f"})
    with pytest.raises(UserError) as err:
        export_model(model_dir, tmp_path / "bf16", "bfloat16")
    assert "avx512_bf16" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bf16").exists()


BF16_AGREEMENT_FLOOR = 0.9


@pytest.mark.skipif(not __import__("paddle_caption.deploy.cpu_features", fromlist=["x"]).has_avx512_bf16(),
                    reason="needs a CPU with AVX512-BF16")
def test_bfloat16_engine_greedy_tokens_mostly_agree_with_float32(exported):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.generate import generate
    from paddle_caption.deploy.engine import InferenceEngine

    _, export_dir, model, engine = exported
    bf16 = InferenceEngine(export_dir, precision="bfloat16")
    prompts, images = prompts_and_images(model.config, seed=3, shapes=SHAPES * 2)
    cfg = GenerationConfig(max_new_tokens=12, stop_ids=(), pad_id=0)
    want, got = generate(engine, prompts, images, cfg), generate(bf16, prompts, images, cfg)
    # per row: the share of tokens before the first disagreement (greedy diverges after one)
    agree = [next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), len(w)) / len(w) for w, g in zip(want, got)]
    print(f"bfloat16 vs float32 greedy agreement: {np.mean(agree):.3f} (rows {np.round(agree, 2).tolist()})")
    assert np.mean(agree) >= BF16_AGREEMENT_FLOOR


def test_graphs_give_the_same_rows_when_the_batch_shrinks_and_grows_again(exported):
    """Each graph run at batch 4, 2, 4: row for row the same outputs (Paddle Inference 3.3.1 once
    returned garbage on the regrown batch: visual.ResamplerAttention._project)."""
    from paddle_caption.decoding.batch import left_pad
    from paddle_caption.deploy.engine import mask_bias
    from paddle_caption.model.mgen_vl import image_span_rows

    _, _, model, engine = exported
    prompts, images = prompts_and_images(model.config, seed=5)
    pixels = images.numpy()
    vision = [engine.vision(pixels[:n])[0] for n in (4, 2, 4)]
    assert np.abs(vision[0] - vision[2]).max() == 0 and np.abs(vision[0][:2] - vision[1]).max() < TOL
    prefill = []
    for n in (4, 2, 4):
        ids, mask = left_pad(prompts[:n], 0)
        prefill.append(engine.prefill(ids, mask, mask_bias(mask, ids.shape[1]), image_span_rows(model.config, ids),
                                      vision[0][:n]))
    for a, b in zip(prefill[0], prefill[2]):
        assert np.abs(a - b).max() == 0
    decode = []
    for n, cache in zip((4, 2, 4), prefill):
        _, mask = left_pad(prompts[:n], 0)
        step_mask = np.concatenate([mask, np.ones((n, 1), np.int64)], axis=1)
        decode.append(engine.decode(np.full((n, 1), 7, np.int64), step_mask, mask_bias(step_mask, 1), *cache[1:]))
    for a, b in zip(decode[0], decode[2]):
        assert np.abs(a - b).max() == 0


def test_caption_service_on_the_exported_directory_gives_the_dygraph_captions(exported):
    """The service's engine thread, continuous batching over concurrent requests, on an
    InferenceEngine (load_predictor picks it for an exported directory): the eager captions."""
    import asyncio

    import httpx

    from paddle_caption.data.images import decode_image
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.predict.predictor import load_predictor
    from paddle_caption.serve.engine import EngineOptions

    from .serve_support import b64, build, jpeg_bytes

    model_dir, export_dir, _, _ = exported
    eager, served = load_predictor(model_dir), load_predictor(export_dir)
    assert type(served.model).__name__ == "InferenceEngine"
    images = [jpeg_bytes(seed) for seed in range(5)]
    cfg = GenerationConfig(max_new_tokens=6)
    expected = [eager.decode(eager.generate_ids([eager.preprocess(decode_image(img))], config=cfg)[0])
                for img in images]
    service, _, app = build(served, engine_options=EngineOptions(max_batch_size=3, max_wait_ms=5))

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await asyncio.gather(*[c.post("/v1/captions", json={"image": b64(img), "max_new_tokens": 6})
                                          for img in images])

    service.engine.start()
    try:
        responses = asyncio.run(scenario())
    finally:
        service.engine.stop(10)
    assert [r.status_code for r in responses] == [200] * len(images)
    assert [r.json()[0]["caption"] for r in responses] == expected


def test_export_cli_writes_a_directory_and_refuses_bad_requests_in_one_line(exported, tmp_path, capsys):
    from paddle_caption.deploy import cli

    model_dir = exported[0]
    out = tmp_path / "out"
    assert run_cli(cli.main, [str(model_dir), str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["graphs"]["decode"]["outputs"][0] == "hidden"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    capsys.readouterr()
    for argv in ([str(model_dir), str(out)],  # exists
                 [str(model_dir), str(tmp_path / "int8"), "--precision", "int8"],
                 [str(tmp_path / "missing"), str(tmp_path / "x")]):
        assert run_cli(cli.main, argv) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3
    assert "already exists" in errors[0] and "int8 is not supported" in errors[1] and "missing" in errors[2]
