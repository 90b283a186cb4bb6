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
    from paddle_caption.model.generation import GenerationConfig

    kw.setdefault("max_new_tokens", NEW)
    return GenerationConfig(pad_id=0, stop_ids=(), **kw)


def alone(model, prompts, images, i, cfg):
    from paddle_caption.model.generation import generate

    return generate(model, [prompts[i]], images[i:i + 1], cfg)[0]


def run_schedule(model, prompts, images, schedule: dict, configs: dict, drops: dict | None = None):
    """Step a ContinuousBatch; at step s, rows schedule[s] join (drops[s] leave). -> {row: tokens}."""
    from paddle_caption.model.generation import ContinuousBatch

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
    from paddle_caption.model.generation import ContinuousBatch

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
    from paddle_caption.model.generation import ContinuousBatch, GenerationConfig

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


def test_beam_rows_are_refused_by_the_continuous_batch(setup):
    from paddle_caption.model.generation import ContinuousBatch

    model, prompts, images = setup
    with pytest.raises(ValueError, match="beam"):
        ContinuousBatch(model, pad_id=0).add(prompts[:1], images[:1], [config(num_beams=2)])


def test_decode_batch_logits_equal_decoding_alone_through_joins_and_leaves(setup):
    """The cache level: fixed token streams, rows joining (narrower and wider than the running
    cache) and leaving; every row's logits at every step equal its logits decoded alone."""
    from paddle_caption.model.generation import DecodeBatch

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
