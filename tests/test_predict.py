"""predict_batch.py: batched == one-by-one, resume without duplicates, rejects, shards + merge, errors."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image

from paddle_caption.data.prompts import PromptTemplate, load_template
from paddle_caption.data.samples import build_prompt_ids
from paddle_caption.runtime import UserError, run_cli
from paddle_caption import shards
from paddle_caption.predict import cli, inputs, run
from paddle_caption.predict import predictor as predictor_mod

from .conftest import make_model_dir, random_image_prompts, small_config

MAX_NEW = 6


# ------------------------------------------------------------------------------------ helpers
def jpeg_b64(seed: int, size=(64, 48)) -> str:
    """A noise image: different seeds give visibly different inputs to the model."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_tsv(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def good_rows(n: int, caption: bool = True) -> list[str]:
    return [f"img_{i:03d}\t{jpeg_b64(i)}" + ("\t卡通风格。图片中间是一个红色的圆形。" if caption and i % 2 else "")
            for i in range(n)]


def read_results(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    return [tuple(line.split("\t")) for line in lines[:-1]]


def quiet(**kw) -> run.PredictOptions:
    from paddle_caption.decoding.config import GenerationConfig

    kw.setdefault("generation", GenerationConfig(max_new_tokens=MAX_NEW))
    return run.PredictOptions(progress=False, poll_seconds=0.01, **kw)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("predict_model"))


@pytest.fixture(scope="module")
def predictor(model_dir):
    from paddle_caption.decoding.config import GenerationConfig

    return predictor_mod.load_predictor(model_dir, GenerationConfig(max_new_tokens=MAX_NEW))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, predictor):
    """One uninterrupted single-process run over 7 rows at batch 3: (tsv, results lines)."""
    root = tmp_path_factory.mktemp("predict_reference")
    tsv = write_tsv(root / "test.tsv", good_rows(7))
    run.predict_tsv(predictor, tsv, root / "results.txt", quiet(batch_size=3))
    return tsv, read_results(root / "results.txt")


# ------------------------------------------------------------------------------------ batched == one-by-one
# (both kernel paths: the `kernels` fixture also runs them with Paddle's own kernels, as on a GPU)
def test_generate_batched_equals_one_by_one_for_prompts_of_different_lengths(kernels):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.generate import generate
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    import paddle
    paddle.seed(1)
    cfg = small_config()
    model = MgenVLForCausalLM(cfg)
    rng = np.random.default_rng(0)
    prompts, images = random_image_prompts(cfg, rng, ((2, 3), (11, 1), (5, 2), (0, 14)))
    assert len({len(p) for p in prompts}) == 4

    def both(config):
        batched = generate(model, prompts, images, config)
        alone = [generate(model, [p], images[i:i + 1], config)[0] for i, p in enumerate(prompts)]
        return batched, alone

    config = GenerationConfig(max_new_tokens=8, pad_id=0, stop_ids=())  # vocab 1000: no Qwen stop ids
    batched, alone = both(config)
    assert batched == alone
    assert all(len(ids) == 8 for ids in alone) and len({tuple(ids) for ids in alone}) == 4
    # Now make rows stop at different steps, so finished rows leave the batch mid-way.
    stop = alone[1][3]
    batched, alone = both(GenerationConfig(max_new_tokens=8, pad_id=0, stop_ids=(stop,)))
    assert batched == alone
    assert len(alone[1]) <= 3 and sorted(len(ids) for ids in alone) != [len(alone[0])] * 4


def test_predictor_batched_equals_one_by_one_for_templates_of_different_lengths(predictor, kernels):
    templates = [PromptTemplate("You are a helpful assistant.", "描述图片。"),
                 PromptTemplate("You are a helpful assistant.", "请总结图片的图片风格并描述图片内容，注意准确性。"),
                 PromptTemplate("Be brief.", "Describe the picture.")]
    prompts = [build_prompt_ids(predictor.tokenizer, t) for t in templates] * 2
    assert len({len(p) for p in prompts}) == 3
    images = [predictor.preprocess(Image.open(io.BytesIO(base64.b64decode(jpeg_b64(i))))) for i in range(6)]
    batched = predictor.generate_ids(images, prompts)
    alone = [predictor.generate_ids([img], [p])[0] for img, p in zip(images, prompts)]
    assert batched == alone
    assert all(len(ids) == MAX_NEW for ids in batched)
    assert predictor.caption_batch(images[:2], prompts[:2]) == [predictor.decode(ids) for ids in batched[:2]]


def test_file_level_batched_equals_one_by_one(tmp_path, predictor, reference):
    tsv, expected = reference
    run.predict_tsv(predictor, tsv, tmp_path / "one.txt", quiet(batch_size=1))
    assert read_results(tmp_path / "one.txt") == expected
    assert [rid for rid, _ in expected] == [f"img_{i:03d}" for i in range(7)]
    assert all(caption for _, caption in expected)
    assert len({caption for _, caption in expected}) > 1  # images matter: a row mix-up would show
    assert (tmp_path / "one.txt.rejects").read_text() == ""
    assert not (tmp_path / "one.txt.partial").exists()


def test_clean_caption_and_prompt_sources(tmp_path):
    assert predictor_mod.clean_caption(" a\tb\r\nc\u2028d ") == "a b c d"
    default = load_template(tmp_path)
    assert default == PromptTemplate.from_files()
    (tmp_path / "prompt.json").write_text(json.dumps({"system": "S", "prompt": "P"}))
    assert load_template(tmp_path) == PromptTemplate("S", "P")
    (tmp_path / "mine.txt").write_text("mine\n")
    assert load_template(tmp_path, prompt_file=str(tmp_path / "mine.txt")) == PromptTemplate("S", "mine")
    (tmp_path / "prompt.json").write_text(json.dumps({"system": "S"}))
    with pytest.raises(UserError, match="prompt.json"):
        load_template(tmp_path)


# ------------------------------------------------------------------------------------ crash safety
class CountingPredictor:
    """Wraps a Predictor: counts captioned images, and can crash after `crash_after` batches."""

    def __init__(self, inner, crash_after=None):
        self.inner, self.crash_after, self.batches, self.images = inner, crash_after, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate_ids(self, images, prompts=None, config=None, stats=None):
        if self.crash_after is not None and self.batches == self.crash_after:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill would stop the run mid-way
        self.batches += 1
        self.images.extend(images)
        return self.inner.generate_ids(images, prompts, config, stats)


def test_resume_after_crash_predicts_each_id_once(tmp_path, predictor, reference):
    tsv, expected = reference
    out = tmp_path / "results.txt"
    crashing = CountingPredictor(predictor, crash_after=2)
    with pytest.raises(KeyboardInterrupt):
        run.predict_tsv(crashing, tsv, out, quiet(batch_size=2))
    assert not out.exists()
    partial = out.with_name("results.txt.partial")
    state = shards.read_shard(partial, keep_items=True)
    assert sorted(state.keyed()) == ["img_000", "img_001", "img_002", "img_003"] and not state.complete
    with open(partial, "a", encoding="utf-8") as handle:  # a line torn by the crash
        handle.write('["img_004", "half a capt')

    resumed = CountingPredictor(predictor)
    summary = run.predict_tsv(resumed, tsv, out, quiet(batch_size=2, resume=True))
    assert len(resumed.images) == 3  # only img_004..img_006
    assert summary["resumed"] == 4 and summary["predicted"] == 3
    results = read_results(out)
    assert results == expected  # complete, input order, each id exactly once
    assert not partial.exists()

    # A second crash-free run with --resume and no partial file simply predicts everything again.
    again = CountingPredictor(predictor)
    run.predict_tsv(again, tsv, out, quiet(batch_size=4, resume=True))
    assert len(again.images) == 7 and read_results(out) == expected


def test_resume_refuses_a_partial_file_from_other_settings(tmp_path, predictor, reference):
    from paddle_caption.decoding.config import GenerationConfig

    tsv, _ = reference
    out = tmp_path / "results.txt"
    with pytest.raises(KeyboardInterrupt):
        run.predict_tsv(CountingPredictor(predictor, crash_after=1), tsv, out, quiet(batch_size=2))
    other = quiet(batch_size=2, resume=True, generation=GenerationConfig(max_new_tokens=MAX_NEW + 1))
    with pytest.raises(UserError, match="different input, model"):
        run.predict_tsv(predictor, tsv, out, other)


# ------------------------------------------------------------------------------------ bad images
def test_bad_images_get_an_empty_caption_and_a_rejects_line(tmp_path, predictor):
    garbage = base64.b64encode(b"<html>not an image</html>").decode()
    rows = [f"ok_0\t{jpeg_b64(0)}", "bad_b64\tnot*base64!", f"junk\t{garbage}",
            f"tiny\t{jpeg_b64(1, size=(10, 10))}", f"ok_1\t{jpeg_b64(1)}\tcaption", "empty\t",
            f"four_cols\t{jpeg_b64(2)}\tcaption\textra", "only_an_id"]
    tsv = write_tsv(tmp_path / "test.tsv", rows)
    out = tmp_path / "results.txt"
    summary = run.predict_tsv(predictor, tsv, out, quiet(batch_size=2))
    results = read_results(out)
    assert [rid for rid, _ in results] == ["ok_0", "bad_b64", "junk", "tiny", "ok_1", "empty", "four_cols",
                                           "only_an_id"]
    captions = dict(results)
    assert captions["ok_0"] and captions["ok_1"]
    assert all(captions[k] == "" for k in ("bad_b64", "junk", "tiny", "empty", "four_cols", "only_an_id"))
    rejects = [line.split("\t") for line in (tmp_path / "results.txt.rejects").read_text().splitlines()]
    assert rejects == [["bad_b64", "bad_base64"], ["junk", "undecodable_image"],
                       ["tiny", "image_too_small"], ["empty", "empty_image"],
                       ["four_cols", "wrong_column_count"], ["only_an_id", "wrong_column_count"]]
    assert summary["rejected"] == 6 and summary["predicted"] == 2


# ------------------------------------------------------------------------------------ shards
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_runs_merge_into_the_single_process_output(tmp_path, predictor, reference, world):
    tsv, expected = reference
    out = tmp_path / "results.txt"
    for rank in range(world - 1, 0, -1):  # the other ranks finish first; rank 0 merges
        summary = run.predict_tsv(predictor, tsv, out, quiet(batch_size=2, rank=rank, world_size=world))
        assert summary["images"] == len(range(rank, 7, world)) and summary["results"] is None
        assert shards.read_shard(shards.shard_path(out, rank, world)).complete
    assert not out.exists()
    summary = run.predict_tsv(predictor, tsv, out, quiet(batch_size=2, rank=0, world_size=world))
    assert read_results(out) == expected
    assert summary["total_images"] == 7
    assert not list(tmp_path.glob("results.txt.partial*"))


def test_rank_0_waits_only_for_complete_shards_of_this_run(tmp_path, predictor, reference, monkeypatch):
    tsv, expected = reference
    out = tmp_path / "results.txt"
    stale = shards.shard_path(out, 1, 2)
    stale.write_text(json.dumps({"format": shards.FORMAT, "fingerprint": "old"}) + "\n"
                     + json.dumps(["img_001", "stale", ""]) + "\n" + json.dumps({"complete": 1}) + "\n")
    with pytest.raises(UserError, match=r"timed out .*partial\.rank1-of-2"):
        run.predict_tsv(predictor, tsv, out, quiet(rank=0, world_size=2, merge_timeout=0.05))
    # Ranks also come from paddle.distributed.launch's environment variables.
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    assert run.predict_tsv(predictor, tsv, out, quiet(batch_size=2))["rank"] == 1
    monkeypatch.setenv("PADDLE_TRAINER_ID", "0")
    run.predict_tsv(predictor, tsv, out, quiet(batch_size=2, resume=True))  # rank 0 resumes its own shard
    assert read_results(out) == expected


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("rows, message", [
    (["a\tx", "", "b\tx", "a\ty"], r"test\.tsv:4: duplicate id 'a' \(first on line 1\)"),
    (["a\tx", "b\tx\tc\td", "a\tx\tc\td"], r"test\.tsv:3: duplicate id 'a'"),
    (["\tx"], r"test\.tsv:1: cannot read the row's id \(empty_id"),
    ([b"\xff\xfeid\tx"], r"test\.tsv:1: cannot read the row's id \(invalid_utf8"),
    ([], r"test\.tsv: no rows"),
])
def test_rows_without_a_usable_id_are_user_errors(tmp_path, rows, message):
    path = tmp_path / "test.tsv"
    path.write_bytes(b"".join((r if isinstance(r, bytes) else r.encode()) + b"\n" for r in rows))
    with pytest.raises(UserError, match=message):
        inputs.read_test_rows(path)


def test_cli_errors_are_one_line(tmp_path, capsys, model_dir):
    tsv = write_tsv(tmp_path / "test.tsv", good_rows(2))
    cases = [
        ([str(tsv), str(tmp_path / "r.txt"), str(tmp_path / "no_model")], "model directory not found"),
        ([str(tmp_path / "missing.tsv"), str(tmp_path / "r.txt"), str(model_dir)], "cannot read test file"),
        ([str(tsv), str(tmp_path / "r.txt"), str(model_dir), "--rank", "2", "--world_size", "2"], "rank"),
        ([str(tsv), str(tmp_path / "r.txt"), str(model_dir), "--top_p", "0"], "top_p"),
        ([str(tsv), str(tmp_path / "r.txt"), str(model_dir), "--prompt_file", "nope.txt"], "nope.txt"),
        ([str(tsv), str(tmp_path / "r.txt"), str(model_dir), "--dtype", "bfloat16"], "--dtype bfloat16: "),
        ([str(tsv), str(tmp_path / "r.txt"), str(model_dir), "--speculative", "retrieval"], "no draft_datastore/"),
        ([str(tsv), str(tmp_path / "r.txt"), str(model_dir), "--speculative", "retrieval", "--draft_source",
          str(tmp_path / "none.txt")], "none.txt: no such file"),
    ]
    for argv, message in cases:
        assert run_cli(cli.main, argv + ["--no_progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_cli_writes_results_and_summary(tmp_path, capsys, model_dir, reference):
    tsv, expected = reference
    out = tmp_path / "results.txt"
    argv = [str(tsv), str(out), str(model_dir), "--max_new_tokens", str(MAX_NEW), "--batch_size", "4",
            "--no_progress", "--limit", "5"]
    assert run_cli(cli.main, argv) == 0
    assert read_results(out) == expected[:5]
    assert "5 images (0 resumed, 5 predicted, 0 rejected)" in capsys.readouterr().out


def test_cli_scores_add_each_captions_mean_logprob_as_a_third_column(tmp_path, capsys, model_dir, predictor):
    """--scores: the same captions, plus the mean token log-probability of each (what the caption
    service reports as mean_logprob: the per-token log-probs of the generated ids), empty for a reject."""
    from paddle_caption.data.images import b64decode_strict, decode_image
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.logprobs import LogprobRecorder
    from paddle_caption.decoding.scheduler import ContinuousBatch

    tsv = write_tsv(tmp_path / "test.tsv", good_rows(3, caption=False) + ["bad\tnot*base64!"])
    plain, scored = tmp_path / "plain.txt", tmp_path / "scored.txt"
    common = [str(model_dir), "--max_new_tokens", str(MAX_NEW), "--batch_size", "2", "--no_progress"]
    assert run_cli(cli.main, [str(tsv), str(plain), *common]) == 0
    assert run_cli(cli.main, [str(tsv), str(scored), *common, "--scores"]) == 0
    rows = read_results(scored)
    assert [r[:2] for r in rows] == read_results(plain) and all(len(r) == 3 for r in rows)
    assert rows[-1] == ("bad", "", "")
    # each score is the mean of the log-probs recorded while the caption was generated alone
    for row, line in zip(rows[:3], good_rows(3, caption=False)):
        image = predictor.preprocess(decode_image(b64decode_strict(line.split("\t")[1])))
        cfg = predictor.fill_stop_and_pad_ids(GenerationConfig(max_new_tokens=MAX_NEW, logprobs=True))
        batch = ContinuousBatch(predictor.model, predictor.tokenizer.pad_id)
        batch.observer = recorder = LogprobRecorder()
        (request,) = batch.add([predictor.prompt_ids], predictor.pixels([image]), [cfg])
        while batch:
            batch.step()
            entries = recorder.collect(request)
        assert float(row[2]) == pytest.approx(np.mean([e.logprob for e in entries]), abs=1e-4)
        assert float(row[2]) < 0


def test_dtype_option_loads_a_bfloat16_model_directory(tmp_path, model_dir):
    """A bfloat16 model directory loads as float32 on a CPU (its exact values), by default or by
    `--dtype float32`, and predicts; `--dtype bfloat16` needs a GPU and is refused before anything
    loads (here: before the missing directory is noticed)."""
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    MgenVLForCausalLM.from_pretrained(model_dir, dtype="bfloat16").save_pretrained(tmp_path / "bf16")
    rounded = MgenVLForCausalLM.from_pretrained(tmp_path / "bf16", dtype="float32")
    for dtype in (None, "float32"):
        loaded = predictor_mod.load_predictor(tmp_path / "bf16", dtype=dtype)
        assert loaded.model.dtype == "float32"
        for key, value in rounded.state_dict().items():
            np.testing.assert_array_equal(loaded.model.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    with pytest.raises(UserError, match="--dtype bfloat16: .* needs a GPU; on CPU use float32"):
        predictor_mod.load_predictor(tmp_path / "no_such_dir", dtype="bfloat16")

    tsv = write_tsv(tmp_path / "test.tsv", good_rows(3))
    summary = run.predict_file(tsv, tmp_path / "r.txt", tmp_path / "bf16", quiet(dtype="float32"))
    assert summary["predicted"] == 3 and len(read_results(tmp_path / "r.txt")) == 3


def test_cli_speculative_retrieval_writes_the_same_results(tmp_path, capsys, model_dir, reference):
    """Drafting from a captions file built on the fly: the same RESULTS.txt, and the summary
    reports the drafting (acceptance itself is tested in test_speculative.py)."""
    tsv, expected = reference
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(caption + "\n" for _, caption in expected), encoding="utf-8")
    out = tmp_path / "results.txt"
    argv = [str(tsv), str(out), str(model_dir), "--max_new_tokens", str(MAX_NEW), "--batch_size", "3",
            "--no_progress", "--speculative", "retrieval", "--draft_source", str(captions)]
    assert run_cli(cli.main, argv) == 0
    assert read_results(out) == expected
    assert "speculative decoding (retrieval): " in capsys.readouterr().out


def test_num_return_sequences_gives_n_candidates_per_prompt():
    """n best beams (the first is the usual beam-search result) or n samples, one prompt's after another."""
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.generate import generate
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(2)
    cfg = small_config()
    model = MgenVLForCausalLM(cfg)
    rng = np.random.default_rng(1)
    prompts, images = random_image_prompts(cfg, rng, ((3, 0), (6, 0)))
    base = dict(max_new_tokens=5, pad_id=0, stop_ids=())
    best = generate(model, prompts, images, GenerationConfig(num_beams=3, **base))
    three = generate(model, prompts, images, GenerationConfig(num_beams=3, num_return_sequences=3, **base))
    assert len(three) == 6 and three[0] == best[0] and three[3] == best[1]
    assert len({tuple(x) for x in three[:3]}) == 3  # distinct hypotheses
    sampled = generate(model, prompts, images, GenerationConfig(do_sample=True, num_return_sequences=4, seed=3, **base))
    alone = generate(model, prompts[1:], images[1:], GenerationConfig(do_sample=True, num_return_sequences=4, seed=3, **base))
    assert len(sampled) == 8 and all(len(x) == 5 for x in sampled)
    assert len({tuple(x) for x in sampled[:4]}) > 1
    assert len(alone) == 4
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationConfig(num_return_sequences=2).validate()
