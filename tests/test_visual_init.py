"""The from-scratch initialisation of the vision tower (config: resampler_init_scale)."""
from __future__ import annotations

import numpy as np

from paddle_caption.model.config import VisualConfig

import paddle


def tower(**overrides):
    from paddle_caption.model.visual import VisionTower

    # the embedded default's tower (config/model/tiny.json) with one ViT layer: the sin-cos table
    # needs its 64 dims to resolve a 16x16 query grid
    base = dict(image_size=112, patch_size=14, width=64, layers=1, heads=4, mlp_ratio=2.0, output_dim=64,
                n_queries=256, resampler_heads=2)
    base.update(overrides)
    paddle.seed(0)
    return VisionTower(VisualConfig(**base))


def head_scores(resampler):
    """Per-head query-key scores of the position tables alone: [heads, n_queries, n_queries]."""
    pos = resampler.pos_embed.numpy()
    dim = pos.shape[1]
    weight = resampler.attn.in_proj_weight.numpy()
    q, k = pos @ weight[:, :dim], pos @ weight[:, dim:2 * dim]
    heads = resampler.attn.heads
    q = q.reshape(len(pos), heads, -1).transpose(1, 0, 2)
    k = k.reshape(len(pos), heads, -1).transpose(1, 0, 2)
    return q @ k.transpose(0, 2, 1)


def test_local_init_makes_every_head_attend_to_its_own_position():
    scores = head_scores(tower(resampler_init_scale=4.0).attn_pool)
    for head in scores:
        # strictly the best key on both axes, not only on one (an identity Q/K would give head 0
        # only the row axis and tie every column)
        assert (head.argmax(axis=1) == np.arange(len(head))).all()
        off_diagonal = head[~np.eye(len(head), dtype=bool)].reshape(len(head), -1).max(axis=1)
        assert (np.diag(head) > off_diagonal).all()


def test_default_init_is_qwen_vl_random():
    pool = tower().attn_pool
    assert np.all(pool.ln_q.weight.numpy() == 1.0)
    assert (head_scores(pool)[0].argmax(axis=1) != np.arange(256)).mean() > 0.5


def _left_right_spread(visual):
    image = np.zeros((1, 3, 112, 112), dtype=np.float32)
    image[:, :, :, :56] = -1.5  # dark left half, light right half
    image[:, :, :, 56:] = 1.5
    with paddle.no_grad():
        tokens = visual(paddle.to_tensor(image)).numpy()[0].reshape(16, 16, -1)  # query grid, row-major
    left, right = tokens[:, :8].reshape(128, -1), tokens[:, 8:].reshape(128, -1)
    return float(np.linalg.norm(left.mean(0) - right.mean(0)))


def test_local_init_keeps_where_things_are_in_the_image_tokens():
    # Random Q/K average the whole image into every token; the local start keeps halves apart.
    assert _left_right_spread(tower(resampler_init_scale=4.0)) > 3 * _left_right_spread(tower())
