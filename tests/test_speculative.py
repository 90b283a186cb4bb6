"""Speculative decoding: the datastore, the drafter, rollback of the KV cache, and output identical to
plain greedy decoding (random prompts, wrong drafts, mixed batches; a trained model over 100 images)."""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from .conftest import random_image_prompts, small_config

NEW = 12


# ------------------------------------------------------------------------------------ the datastore
def test_suffix_array_sorts_every_suffix_by_its_first_depth_tokens():
    from paddle_caption.decoding.datastore import suffix_array

    rng = np.random.default_rng(0)
    for n, vocab, depth in ((1, 3, 4), (50, 2, 4), (300, 5, 8), (400, 40, 16)):
        tokens = rng.integers(-1, vocab, n).astype(np.int32)
        order = suffix_array(tokens, depth)
        assert sorted(order.tolist()) == list(range(n))
        keys = [tokens[p:p + depth].tolist() for p in order]
        assert keys == sorted(keys)  # a shorter key (the array's end) sorts first, as a prefix does


def build_store(captions: list[list[int]], depth: int = 16):
    from paddle_caption.decoding.datastore import DraftDatastore

    return DraftDatastore.build(captions, depth=depth)


def occurrences(store, pattern) -> list[int]:
    body = store.tokens[:store.size]
    return [p for p in range(store.size) if body[p:p + len(pattern)].tolist() == list(pattern)]


def test_find_returns_exactly_the_occurrences_and_most_frequent_the_mode():
    from paddle_caption.decoding.datastore import START

    rng = np.random.default_rng(1)
    captions = [list(rng.integers(0, 6, rng.integers(1, 12))) for _ in range(200)]
    store = build_store(captions)
    for pattern in ([START], [3], [1, 2], [START, 4, 4], [5, 5, 5, 5], [0, 1, 2, 3, 4, 5]):
        lo, hi = store.find(pattern)
        assert sorted(store.suffix[lo:hi].tolist()) == occurrences(store, pattern)
        if hi > lo:
            token, run_lo, run_hi = store.most_frequent(lo, hi, len(pattern))
            following = [int(store.tokens[p + len(pattern)]) for p in occurrences(store, pattern)]
            counts = {t: following.count(t) for t in following}
            assert counts[token] == max(counts.values()) == run_hi - run_lo


def test_wide_ranges_pick_the_mode_from_a_sample_and_narrow_exactly():
    # 3000 captions: the start marker's range is wider than the exact-scan limit
    captions = [[7, 8, 9]] * 2000 + [[7, 5]] * 600 + [[6]] * 400
    store = build_store(captions)
    token, lo, hi = store.most_frequent(*store.find([-1]), 1)
    assert token == 7 and hi - lo == 2600
    assert store.narrow(lo, hi, 2, 8) == store.find([-1, 7, 8])


def test_save_load_round_trip_and_format_errors(tmp_path):
    from paddle_caption.decoding.datastore import DraftDatastore
    from paddle_caption.runtime import UserError

    store = build_store([[1, 2, 3], [1, 2, 4], [5]])
    store.save(tmp_path / "ds")
    again = DraftDatastore.load(tmp_path / "ds")
    assert not again.tokens.flags.owndata and not again.suffix.flags.owndata  # mapped, not read
    assert again.depth == store.depth and again.info["captions"] == 3
    assert np.array_equal(again.tokens, store.tokens) and np.array_equal(again.suffix, store.suffix)
    meta = json.loads((tmp_path / "ds" / "datastore.json").read_text())
    (tmp_path / "ds" / "datastore.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(UserError, match="format 'other/9'"):
        DraftDatastore.load(tmp_path / "ds")
    with pytest.raises(UserError, match="not a draft datastore"):
        DraftDatastore.load(tmp_path)


def test_captions_files_and_their_errors(tmp_path):
    from paddle_caption.decoding.datastore import DraftDatastore, load_datastore, read_captions
    from paddle_caption.runtime import UserError
    from paddle_caption.tokenizer import QWenVLTokenizer

    (tmp_path / "caps.txt").write_text("卡通风格。图片中间是一个红色的圆形。\n\n写实风格。\n", encoding="utf-8")
    assert read_captions(tmp_path / "caps.txt") == ["卡通风格。图片中间是一个红色的圆形。", "写实风格。"]
    # JSON lines are read by data.records.iter_captions: records, curated samples, caption exports
    record = {"id": "a", "caption": "x", "tsv": "t.tsv", "offset": 0, "length": 9, "width": 64, "height": 48}
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n\n" + json.dumps({**record, "id": "b", "caption": "y"})
                                      + "\n", encoding="utf-8")
    assert read_captions(tmp_path / "r.jsonl") == ["x", "y"]
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n" + '{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r'r.jsonl:2: expected an object with a "caption" string'):
        read_captions(tmp_path / "r.jsonl")
    tok = QWenVLTokenizer.from_pretrained()
    store = DraftDatastore.from_file(tmp_path / "caps.txt", tok)
    first = tok.encode("卡通风格。图片中间是一个红色的圆形。") + [tok.im_end_id]
    assert store.tokens[:len(first) + 1].tolist() == [-1] + first  # start marker, ids, <|im_end|>
    with pytest.raises(UserError, match="has no draft_datastore"):
        load_datastore(tmp_path, tok)
    with pytest.raises(UserError, match="no such file"):
        load_datastore(tmp_path, tok, tmp_path / "missing.txt")


class FakeRow:
    def __init__(self, tokens):
        self.tokens, self.draft_state = list(tokens), None


def test_retrieval_drafter_follows_the_longest_matching_suffix():
    from paddle_caption.decoding.drafting import RetrievalDrafter

    stop = 99
    captions = [[1, 2, 3, 4, 5, stop]] * 3 + [[1, 2, 3, 6, 7, stop], [8, 3, 4, 9, stop]]
    store = build_store(captions)
    drafter = RetrievalDrafter(store, num_draft_tokens=8, stop_ids=(stop,))
    row = FakeRow([])
    assert drafter.draft(row, 8).tokens.tolist() == [1, 2, 3, 4, 5, stop]  # the most frequent caption, to its stop
    row.tokens += [1, 2, 3, 6]
    assert drafter.draft(row, 8).tokens.tolist() == [7, stop]
    assert drafter.draft(row, 1).tokens.tolist() == [7]  # the limit (max_new_tokens, cache room) holds
    row.tokens += [0, 3, 4]  # 0 occurs nowhere: the match falls back to the longest suffix, [3, 4]
    assert drafter.draft(row, 8).tokens.tolist() == [5, stop]  # [3, 4] continues as 5 three times, 9 once
    assert row.draft_state.start == 1 + 5  # text = [START, 1, 2, 3, 6, 0, 3, 4]: suffix [3, 4]
    row.tokens += [77]  # occurs nowhere: no match, no draft
    assert drafter.draft(row, 8).tokens.tolist() == []
    row.tokens += [8]  # matches again
    assert drafter.draft(row, 8).tokens.tolist() == [3, 4, 9, stop]
    # min_share: stop before a token that less than that share of the matches continue with
    unsure = RetrievalDrafter(store, num_draft_tokens=8, stop_ids=(stop,), min_share=0.8)
    assert unsure.draft(FakeRow([1, 2]), 8).tokens.tolist() == [3]  # then 4 in 3 of 4 matches only
    assert unsure.draft(FakeRow([1, 2, 3, 4]), 8).tokens.tolist() == [5, stop]
    with pytest.raises(ValueError, match="num_draft_tokens"):
        RetrievalDrafter(store, num_draft_tokens=16)


# ------------------------------------------------------------------------------------ a random model
@pytest.fixture(scope="module")
def setup():
    """A small random model and six image prompts of different lengths (vocab 1000)."""
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(2)
    cfg = small_config()
    model = MgenVLForCausalLM(cfg)
    model.eval()
    rng = np.random.default_rng(4)
    prompts, images = random_image_prompts(cfg, rng, ((2, 3), (11, 1), (5, 2), (0, 14), (20, 9), (7, 7)))
    return model, prompts, images


def config(**kw):
    from paddle_caption.decoding.config import GenerationConfig

    kw.setdefault("max_new_tokens", NEW)
    return GenerationConfig(pad_id=0, stop_ids=kw.pop("stop_ids", ()), **kw)


def test_step_many_and_rollback_give_the_logits_of_one_token_steps(setup, kernels):
    """Rows fed several tokens at once, then rolled back by different amounts (holes, cuts, a
    compaction, a row joining in between): every row's logits equal its one-token steps alone."""
    from paddle_caption.decoding.batch import DecodeBatch

    model, prompts, images = setup
    rng = np.random.default_rng(5)
    n = 4
    streams = [list(rng.integers(0, 900, 40)) for _ in range(n + 1)]

    def alone(i, count):
        batch = DecodeBatch(model, pad_id=0)
        batch.add([prompts[i]], images[i:i + 1])
        out = [batch.logits[0].copy()]
        for token in streams[i][:count]:
            batch.step(np.array([token]))
            out.append(batch.logits[0].copy())
        return out

    batch = DecodeBatch(model, pad_id=0)
    batch.add(prompts[:n], images[:n])
    order, done = list(range(n)), [0] * n  # tokens of its stream each row has kept
    seen = {i: [batch.logits[r].copy()] for r, i in enumerate(order)}
    for step in range(7):
        if step == 3:  # a row joins a cache with holes
            batch.add([prompts[n]], images[n:n + 1])
            order.append(n)
            done.append(0)
            seen[n] = [batch.logits[-1].copy()]
        m = int(rng.integers(2, 6))
        lengths = rng.integers(1, m + 1, len(order))
        feed = np.array([streams[i][done[i]:done[i] + m] for i in order])
        logits = batch.step_many(feed, lengths).logits
        assert logits.shape[0] == lengths.sum()
        kept = np.array([rng.integers(1, length + 1) for length in lengths])
        starts = np.cumsum(lengths) - lengths
        for r, i in enumerate(order):  # the logits after each kept token
            seen[i] += [logits[starts[r] + j].copy() for j in range(kept[r])]
        batch.rollback(kept)
        for r, i in enumerate(order):
            done[i] += int(kept[r])
            np.testing.assert_array_equal(batch.logits[r], seen[i][-1])
        longest = max(len(prompts[i]) + done[i] for i in order)
        assert longest <= batch.width <= longest + longest // 7  # holes are squeezed out when they grow
        if step == 4:
            batch.compact()
            assert batch.width == longest
    for i in order:
        np.testing.assert_allclose(np.stack(seen[i]), np.stack(alone(i, done[i])), rtol=0, atol=3e-5)
    with pytest.raises(ValueError, match="rollback needs a step_many"):
        batch.rollback(np.ones(len(order), dtype=np.int64))


class ScriptedDrafter:
    """Drafts each row's known greedy continuation (rows are tagged with their index), with a wrong
    token, `wrong(token)`, at position `wrong_at(step, row)` of the draft (None: no wrong token).
    Counts how many drafted tokens verification must accept."""

    name = "scripted"

    def __init__(self, answers: dict, num_draft_tokens: int, wrong_at=lambda step, row: None,
                 wrong=lambda token: (token + 1) % 900):
        self.answers, self.num_draft_tokens, self.wrong_at, self.wrong = answers, num_draft_tokens, wrong_at, wrong
        self.calls, self.expected_accepted = 0, 0

    def propose(self, rows, limits):
        drafts = []
        for row, limit in zip(rows, limits):
            done = len(row.tokens)
            draft = list(self.answers[row.tag][done:done + min(limit, self.num_draft_tokens)])
            wrong = self.wrong_at(self.calls, row.tag)
            if wrong is not None and wrong < len(draft):
                draft[wrong] = self.wrong(draft[wrong])
                self.expected_accepted += wrong
            else:
                self.expected_accepted += len(draft)
            drafts.append(draft)
        self.calls += 1
        return drafts


def run_batch(model, prompts, images, configs, drafter=None):
    from paddle_caption.decoding.scheduler import ContinuousBatch, SpeculationStats

    stats = SpeculationStats()
    batch = ContinuousBatch(model, pad_id=0, drafter=drafter, stats=stats)
    rows = batch.add(prompts, images, configs, tags=list(range(len(prompts))))
    while batch:
        batch.step()
    return [row.tokens for row in rows], [row.finish_reason for row in rows], stats


def test_right_drafts_are_all_accepted_and_wrong_ones_rejected(setup, kernels):
    model, prompts, images = setup
    cfgs = [config()] * len(prompts)
    want, reasons, plain = run_batch(model, prompts, images, cfgs)
    answers = dict(enumerate(want))
    assert plain.drafted == 0 and plain.tokens_per_step == 1.0

    right = ScriptedDrafter(answers, 4)
    got, got_reasons, stats = run_batch(model, prompts, images, cfgs, right)
    assert got == want and got_reasons == reasons
    assert stats.accepted == stats.drafted == right.expected_accepted > 0
    assert stats.steps == 3  # 12 tokens: 1 + 4 drafted per step, the last step's drafts capped

    first_wrong = ScriptedDrafter(answers, 4, wrong_at=lambda step, row: 0)
    got, _, stats = run_batch(model, prompts, images, cfgs, first_wrong)
    assert got == want and stats.accepted == 0 and stats.drafted > 0

    # ids the model has no embedding for (a datastore of another vocabulary) end a draft early
    outside = ScriptedDrafter(answers, 4, wrong_at=lambda step, row: 2, wrong=lambda token: 10 ** 6)
    got, _, stats = run_batch(model, prompts, images, cfgs, outside)
    assert got == want and stats.drafted == stats.accepted == outside.expected_accepted > 0

    # a wrong token at a draft position that differs by row and step: exactly the tokens before it
    # are accepted, so rows keep different numbers of their fed tokens (holes in the cache)
    some_wrong = ScriptedDrafter(answers, 4, wrong_at=lambda step, row: (step + row) % 5)
    got, _, stats = run_batch(model, prompts, images, cfgs, some_wrong)
    assert got == want
    assert stats.accepted == some_wrong.expected_accepted and 0 < stats.accepted < stats.drafted


def test_beam_rows_ride_along_with_speculating_greedy_rows(setup, kernels):
    """Beam requests share the batch with greedy rows that verify drafts (several tokens fed per
    row, then rolled back): the beams are never drafted and every request's output is unchanged."""
    model, prompts, images = setup
    cfgs = [config(), config(num_beams=3), config(), config(num_beams=2, length_penalty=0.7), config(),
            config(do_sample=True, seed=2)]
    want, reasons, _ = run_batch(model, prompts, images, cfgs)
    drafter = ScriptedDrafter(dict(enumerate(want)), 4, wrong_at=lambda step, row: (step + row) % 3)
    got, got_reasons, stats = run_batch(model, prompts, images, cfgs, drafter)
    assert got == want and got_reasons == reasons
    assert stats.accepted > 0 and drafter.calls > 0


def test_stop_ids_length_limits_penalties_and_sampling_rows_are_unchanged(setup, kernels):
    """A mixed batch: greedy rows (one stops on a drafted stop id, one with a repetition penalty,
    one with a short max_new_tokens) and sampling rows riding along; every row's tokens are the
    plain run's, drafts right or wrong."""
    model, prompts, images = setup
    free, _, _ = run_batch(model, prompts[:1], images[:1], [config()])
    stop = free[0][5]
    cfgs = [config(stop_ids=(stop,)), config(repetition_penalty=1.3), config(max_new_tokens=3),
            config(do_sample=True, seed=3, temperature=0.9), config(), config(do_sample=True, seed=8, top_k=20)]
    want, reasons, _ = run_batch(model, prompts, images, cfgs)
    assert reasons[0] == "stop" and want[0] == free[0][:free[0].index(stop)] and len(want[2]) == 3
    answers = {i: tokens + ([stop] if i == 0 else []) for i, tokens in enumerate(want)}
    for wrong_at in (lambda step, row: None, lambda step, row: (step + 2 * row) % 4):
        drafter = ScriptedDrafter(answers, 5, wrong_at)
        got, got_reasons, stats = run_batch(model, prompts, images, cfgs, drafter)
        assert got == want and got_reasons == reasons
        assert stats.accepted > 0


def test_retrieval_drafting_on_random_prompts_equals_plain_greedy(setup, kernels):
    """The datastore holds the plain outputs of half the prompts and noise: drafts are partly
    right. One-by-one and batched, the output is plain greedy's."""
    from paddle_caption.decoding.drafting import RetrievalDrafter
    from paddle_caption.decoding.scheduler import SpeculationStats
    from paddle_caption.decoding.generate import generate

    model, prompts, images = setup
    cfg = config(max_new_tokens=16)
    plain = generate(model, prompts, images, cfg)
    rng = np.random.default_rng(6)
    noise = [list(rng.integers(0, 900, 10)) for _ in range(20)]
    store = build_store([plain[i] for i in (0, 2, 4)] + noise, depth=24)
    drafter = RetrievalDrafter(store, num_draft_tokens=6)
    stats = SpeculationStats()
    assert generate(model, prompts, images, cfg, drafter, stats) == plain
    alone = [generate(model, [p], images[i:i + 1], cfg, drafter, stats)[0] for i, p in enumerate(prompts)]
    assert alone == plain
    assert 0 < stats.accepted < stats.drafted


def short_context(setup):
    """(the setup model with seq_length 7 past prompt 4, that prompt, its image, a config of 14 new
    tokens, plain greedy's output): decoding must cross seq_length."""
    from paddle_caption.decoding.generate import generate
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    model, prompts, images = setup
    short = MgenVLForCausalLM(small_config(seq_length=len(prompts[4]) + 7))
    short.set_state_dict(model.state_dict())
    short.eval()
    cfg = config(max_new_tokens=14)
    return short, prompts[4:5], images[4:5], cfg, generate(short, prompts[4:5], images[4:5], cfg)


def test_drafts_stop_where_the_cache_would_outgrow_seq_length(setup):
    """Beyond seq_length Qwen's dynamic NTK depends on the forward's width: no forward may cross
    it, so drafting shrinks and then stops there, and the output stays plain greedy's."""
    short, prompt, image, cfg, want = short_context(setup)
    drafter = ScriptedDrafter({0: want[0]}, 4)
    got, _, stats = run_batch(short, prompt, image, [cfg], drafter)
    assert got == want
    assert stats.drafted == 5  # 4 in the first step, 1 in the second, none once the room is gone


# ------------------------------------------------------------------------------------ a trained model
@pytest.fixture(scope="module")
def trained(trained_micro):
    """The shared trained micro model (conftest.trained_micro): its captions follow the ads' formula,
    so drafts from the training captions get accepted."""
    return trained_micro


@pytest.mark.slow
def test_trained_model_100_images_speculative_equals_greedy_one_by_one_and_batched(trained, kernels):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.scheduler import SpeculationStats
    from paddle_caption.predict.inputs import load_batch, read_test_rows
    from paddle_caption.predict.predictor import load_predictor

    gen = GenerationConfig(max_new_tokens=40)
    plain = load_predictor(trained / "model", gen)
    spec = load_predictor(trained / "model", gen, speculative="retrieval")
    spec.drafter.budget = None  # every draft fed: the assertions below are about the drafts, not this machine's clock
    rows = read_test_rows(trained / "tsv" / "test.tsv")
    assert len(rows) == 100
    with open(trained / "tsv" / "test.tsv", "rb") as handle:
        images, rejects = load_batch(handle.fileno(), rows, plain.preprocess, max_pixels=1 << 24, min_side=0)
    assert not rejects
    images = [images[row.id] for row in rows]
    want = [plain.generate_ids([image])[0] for image in images]
    assert sum(len(ids) for ids in want) > 10 * len(images)
    stats = SpeculationStats()
    assert [spec.generate_ids([image], stats=stats)[0] for image in images] == want
    for start in range(0, len(images), 16):
        assert spec.generate_ids(images[start:start + 16], stats=stats) == want[start:start + 16]
    # the drafts were really used: most drafted tokens accepted, several tokens per forward
    assert stats.acceptance_rate > 0.3 and stats.tokens_per_step > 2.0


@pytest.mark.slow
def test_trained_model_random_text_prompts_equal_greedy(trained, kernels):
    """Prompts the model never saw (random text instead of the instruction): drafts from the
    training captions are mostly wrong there, and the output is still plain greedy's."""
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.scheduler import SpeculationStats
    from paddle_caption.decoding.generate import generate
    from paddle_caption.predict.predictor import load_predictor

    spec = load_predictor(trained / "model", GenerationConfig(max_new_tokens=24), speculative="retrieval")
    tok, rng = spec.tokenizer, np.random.default_rng(7)
    prompts = [[tok.im_start_id] + tok.encode("user\nPicture 1: ") + tok.image_span()
               + list(rng.integers(100, 150000, rng.integers(1, 30))) + [tok.im_end_id, tok.im_start_id]
               for _ in range(8)]
    size = spec.model.config.visual.image_size
    pixels = paddle.to_tensor(rng.standard_normal((len(prompts), 3, size, size)).astype("float32"))
    cfg = spec.gen_config
    want = generate(spec.model, prompts, pixels, cfg)
    stats = SpeculationStats()
    assert generate(spec.model, prompts, pixels, cfg, spec.drafter, stats) == want
    assert [generate(spec.model, [p], pixels[i:i + 1], cfg, spec.drafter, stats)[0]
            for i, p in enumerate(prompts)] == want
    assert stats.drafted > 0
