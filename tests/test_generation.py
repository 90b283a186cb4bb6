"""Continuous batching: rows join a running decode batch and leave it without changing anyone's tokens."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from .conftest import random_image_prompts, small_config

NEW = 8


@pytest.fixture(scope="module")
def setup():
    """A small random model and five image prompts of different lengths (vocab 1000: no Qwen stop ids)."""
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(1)
    cfg = small_config()
    model = MgenVLForCausalLM(cfg)
    model.eval()
    rng = np.random.default_rng(0)
    prompts, images = random_image_prompts(cfg, rng, ((2, 3), (11, 1), (5, 2), (0, 14), (20, 9)))
    return model, prompts, images


def config(**kw):
    from paddle_caption.decoding.config import GenerationConfig

    kw.setdefault("max_new_tokens", NEW)
    kw.setdefault("stop_ids", ())
    return GenerationConfig(pad_id=0, **kw)


def alone(model, prompts, images, i, cfg):
    from paddle_caption.decoding.generate import generate

    return generate(model, [prompts[i]], images[i:i + 1], cfg)[0]


def run_schedule(model, prompts, images, schedule: dict, configs: dict, drops: dict | None = None):
    """Step a ContinuousBatch; at step s, rows schedule[s] join (drops[s] leave). -> {row: tokens}."""
    from paddle_caption.decoding.scheduler import ContinuousBatch

    batch, rows, widths, step = ContinuousBatch(model, pad_id=0), {}, [], 0
    while step <= max(schedule) or batch:
        joining = schedule.get(step, [])
        if joining:
            added = batch.add([prompts[i] for i in joining], paddle.gather(images, paddle.to_tensor(joining)),
                              [configs[i] for i in joining], tags=joining)
            rows.update({row.tag: row for row in added})
        if drops and step in drops:
            batch.drop([rows[i] for i in drops[step]])
        widths.append(batch.decoder.width)
        batch.step()
        step += 1
    return {i: row.tokens for i, row in rows.items()}, widths


def test_a_row_joining_a_running_batch_gets_the_tokens_it_gets_alone(setup):
    model, prompts, images = setup
    cfg = config()
    want = {i: alone(model, prompts, images, i, cfg) for i in range(len(prompts))}
    assert len({tuple(t) for t in want.values()}) == len(prompts)
    # Rows 0 and 1 (263 and 270 tokens) start; row 2 (265) joins at step 2, narrower than the
    # running cache (272); rows 3 and 4 (272, 287) join at step 5 together, their prefill itself
    # left-padded and wider than the running cache (275).
    lengths = [len(p) for p in prompts]
    assert lengths == [263, 270, 265, 272, 287]
    got, widths = run_schedule(model, prompts, images, {0: [0, 1], 2: [2], 5: [3, 4]}, {i: cfg for i in want})
    assert got == want
    assert widths[2] == 272 and widths[5] == 287
    # While rows 0 and 1 are alone, the cache is exactly as wide as the longest of them; it never
    # grows beyond the longest row (prompt + tokens so far), because unused columns are cut.
    assert widths[0] == max(len(prompts[0]), len(prompts[1]))
    assert max(widths) <= max(len(p) for p in prompts) + NEW


def test_rows_with_their_own_settings_share_a_batch(setup):
    model, prompts, images = setup
    configs = {0: config(max_new_tokens=3), 1: config(do_sample=True, seed=7, temperature=0.8, top_k=40),
               2: config(repetition_penalty=1.3), 3: config(do_sample=True, seed=11, top_p=0.9), 4: config()}
    want = {i: alone(model, prompts, images, i, cfg) for i, cfg in configs.items()}
    assert len(want[0]) == 3 and want[1] != alone(model, prompts, images, 1, config(do_sample=True, seed=8))
    got, _ = run_schedule(model, prompts, images, {0: [0, 1, 2], 1: [3], 3: [4]}, configs)
    assert got == want


def test_dropped_rows_leave_and_free_their_cache(setup):
    from paddle_caption.decoding.scheduler import ContinuousBatch

    model, prompts, images = setup
    cfg = config()
    want = {i: alone(model, prompts, images, i, cfg) for i in (0, 2)}
    got, widths = run_schedule(model, prompts, images, {0: [0, 4, 2]}, {0: cfg, 2: cfg, 4: cfg}, drops={2: [4]})
    assert got[0] == want[0] and got[2] == want[2] and len(got[4]) == 2
    # Row 4 has the longest prompt: once it is gone the cache shrinks to the longest remaining row.
    assert widths[1] == len(prompts[4]) + 1
    assert widths[2] == max(len(prompts[0]), len(prompts[2])) + 2

    batch = ContinuousBatch(model, pad_id=0)
    rows = batch.add(prompts[:2], images[:2], [cfg, cfg])
    batch.drop(rows)
    assert len(batch) == 0 and batch.decoder.width == 0 and batch.step() == []


def test_finish_reasons_and_the_stop_id_is_not_returned(setup):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.scheduler import ContinuousBatch

    model, prompts, images = setup
    free = alone(model, prompts, images, 1, config())
    stop = free[3]
    batch = ContinuousBatch(model, pad_id=0)
    rows = batch.add(prompts[1:3], images[1:3], [GenerationConfig(max_new_tokens=NEW, pad_id=0, stop_ids=(stop,)),
                                                 config(max_new_tokens=2)])
    finished = []
    while batch:
        finished += batch.step()
    assert rows[0].tokens == free[:free.index(stop)] and rows[0].finish_reason == "stop"
    assert len(rows[1].tokens) == 2 and rows[1].finish_reason == "length"
    assert sorted(map(id, finished)) == sorted(map(id, rows))


def reference_beam_search(model, prompts, images, cfg):
    """The lockstep beam search the kit ran before beam requests joined the scheduler (verbatim
    from model/generation.py `_beam_search`, commit 9d8bd1d, but for the int64 cast in `seen`: that
version crashed with a repetition penalty, a float union of no tokens yet): the oracle for the
beam tests."""
    from paddle_caption.decoding.batch import DecodeBatch, repeat_images
    from paddle_caption.decoding.logits import apply_repetition_penalty, log_softmax

    beams = cfg.num_beams
    expanded = [p for p in prompts for _ in range(beams)]
    images = repeat_images(model, prompts, images, [beams] * len(prompts))
    decoder = DecodeBatch(model, cfg.pad_id)
    decoder.add(expanded, images)
    n = len(prompts)
    scores = np.zeros((n, beams), dtype=np.float64)
    scores[:, 1:] = -np.inf
    tokens_so_far = [[[] for _ in range(beams)] for _ in range(n)]
    finished = [[] for _ in range(n)]
    seen_base = [np.unique(np.asarray(p, dtype=np.int64)) for p in prompts]
    stop = set(cfg.stop_ids)
    done = np.zeros(n, dtype=bool)
    for step in range(cfg.max_new_tokens):
        seen = [np.union1d(seen_base[i], np.asarray(tokens_so_far[i][b], dtype=np.int64))
                for i in range(n) for b in range(beams)]
        logits = apply_repetition_penalty(decoder.logits, seen, cfg.repetition_penalty)
        logp = log_softmax(logits).reshape(n, beams, -1)
        vocab = logp.shape[-1]
        total = (scores[:, :, None] + logp).reshape(n, -1)
        top = np.argpartition(-total, 2 * beams, axis=-1)[:, : 2 * beams]
        next_rows, next_tokens = [], []
        for i in range(n):
            candidates = top[i][np.argsort(-total[i, top[i]])]
            new_scores, new_tokens, new_parents = [], [], []
            for flat in candidates:
                parent, token = divmod(int(flat), vocab)
                value = total[i, flat]
                if not np.isfinite(value):
                    continue
                if token in stop:
                    length = len(tokens_so_far[i][parent]) + 1
                    finished[i].append((value / length ** cfg.length_penalty, tokens_so_far[i][parent]))
                    continue
                new_scores.append(value)
                new_tokens.append(token)
                new_parents.append(parent)
                if len(new_scores) == beams:
                    break
            if len(finished[i]) >= beams or done[i]:
                done[i] = True
            while len(new_scores) < beams:
                new_scores.append(-np.inf)
                new_tokens.append(cfg.pad_id)
                new_parents.append(0)
            scores[i] = new_scores
            tokens_so_far[i] = [tokens_so_far[i][p] + [t] for p, t in zip(new_parents, new_tokens)]
            next_rows.extend(i * beams + p for p in new_parents)
            next_tokens.extend(new_tokens)
        if done.all() or step == cfg.max_new_tokens - 1:
            break
        decoder.keep(np.asarray(next_rows))
        decoder.step(np.asarray(next_tokens, dtype=np.int64))
    results = []
    for i in range(n):
        pool = list(finished[i])
        if not done[i]:
            for b in range(beams):
                if np.isfinite(scores[i, b]):
                    length = max(len(tokens_so_far[i][b]), 1)
                    pool.append((scores[i, b] / length ** cfg.length_penalty, tokens_so_far[i][b]))
        ranked = sorted(pool, key=lambda item: -item[0])[:cfg.num_return_sequences]
        ranked += [(0.0, [])] * (cfg.num_return_sequences - len(ranked))
        results.extend(list(tokens) for _, tokens in ranked)
    return results


def beam_configs(setup):
    """Beam settings that exercise every rule: stop ids that end hypotheses early, the length and
    repetition penalties, several results per prompt."""
    model, prompts, images = setup
    free = alone(model, prompts, images, 1, config())
    stops = (free[2], free[5])
    return [config(num_beams=3, stop_ids=stops),
            config(num_beams=2, length_penalty=0.6, repetition_penalty=1.3, stop_ids=stops),
            config(num_beams=4, num_return_sequences=3, stop_ids=stops[:1]),
            config(num_beams=2, max_new_tokens=3)]


def test_beam_search_equals_the_lockstep_beam_search(setup):
    from paddle_caption.decoding.generate import generate

    model, prompts, images = setup
    for cfg in beam_configs(setup):
        for i in range(len(prompts)):
            want = reference_beam_search(model, [prompts[i]], images[i:i + 1], cfg)
            assert generate(model, [prompts[i]], images[i:i + 1], cfg) == want, (cfg, i)
        # several prompts in one call: each gets what it gets alone
        want = [ids for i in (0, 3, 4) for ids in reference_beam_search(model, [prompts[i]], images[i:i + 1], cfg)]
        assert generate(model, [prompts[i] for i in (0, 3, 4)], paddle.gather(images, paddle.to_tensor([0, 3, 4])),
                        cfg) == want, cfg


def test_beam_requests_share_the_continuous_batch_with_greedy_and_sampling_rows(setup):
    """Beam requests join a running batch of greedy and sampling rows at step boundaries (their
    rows re-selected every step through the cache's keep) and give the lockstep beam search's
    output; the other rows keep their own tokens; a dropped beam request frees its rows."""
    from paddle_caption.decoding.scheduler import ContinuousBatch

    model, prompts, images = setup
    beam_a, beam_b, *_ = beam_configs(setup)
    configs = {0: config(), 1: beam_a, 2: config(do_sample=True, seed=5, top_k=30), 3: beam_b, 4: beam_a}
    want = {i: (reference_beam_search(model, [prompts[i]], images[i:i + 1], cfg)[0] if cfg.num_beams > 1
                else alone(model, prompts, images, i, cfg)) for i, cfg in configs.items()}
    got, widths = run_schedule(model, prompts, images, {0: [0, 1], 2: [2, 3], 4: [4]}, configs)
    assert got == want
    assert len({tuple(t) for t in want.values()}) > 1

    batch = ContinuousBatch(model, pad_id=0)
    rows = batch.add(prompts[:2], images[:2], [beam_a, config()])
    assert len(batch) == beam_a.num_beams + 1  # one cache row per beam
    batch.step()
    batch.drop(rows[:1])
    assert len(batch) == 1 and batch.rows == [rows[1]]


def test_decode_batch_logits_equal_decoding_alone_through_joins_and_leaves(setup):
    """The cache level: fixed token streams, rows joining (narrower and wider than the running
    cache) and leaving; every row's logits at every step equal its logits decoded alone."""
    from paddle_caption.decoding.batch import DecodeBatch

    model, prompts, images = setup
    rng = np.random.default_rng(3)
    feeds = [rng.integers(0, 900, 6) for _ in prompts]  # the token each row is fed at each of its steps

    def alone_logits(i):
        batch = DecodeBatch(model, pad_id=0)
        batch.add([prompts[i]], images[i:i + 1])
        out = [batch.logits[0].copy()]
        for token in feeds[i]:
            batch.step(np.array([token]))
            out.append(batch.logits[0].copy())
        return out

    want = [alone_logits(i) for i in range(len(prompts))]
    batch, order, steps_done = DecodeBatch(model, pad_id=0), [], {}
    got = {i: [] for i in range(len(prompts))}
    schedule = {0: [0, 1], 2: [2], 3: [3, 4]}
    for step in range(12):
        for i in schedule.get(step, []):
            batch.add([prompts[i]], images[i:i + 1])
            order.append(i)
            steps_done[i] = 0
        for row, i in enumerate(order):
            got[i].append(batch.logits[row].copy())
        live = [r for r, i in enumerate(order) if steps_done[i] < len(feeds[i])]
        if len(live) < len(order):
            batch.keep(live)
            order = [order[r] for r in live]
        if not order:
            break
        batch.step(np.array([feeds[i][steps_done[i]] for i in order]))
        for i in order:
            steps_done[i] += 1
    for i in range(len(prompts)):
        assert len(got[i]) == len(want[i])
        np.testing.assert_allclose(np.stack(got[i]), np.stack(want[i]), rtol=0, atol=2e-5)
