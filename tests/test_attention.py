"""The attention core: the numpy CPU path equals the plain Paddle expression, values and gradients."""
from __future__ import annotations

import numpy as np
import pytest

from paddle_caption.model import attention as attention_module
from paddle_caption.model.attention import attention
from paddle_caption.model.qwen import MASK_VALUE

import paddle


def paddle_reference(q, k, v, scale, bias):
    scores = paddle.matmul(q * scale, k, transpose_y=True)
    if bias is not None:
        scores = scores + bias
    return paddle.matmul(paddle.nn.functional.softmax(scores, axis=-1), v)


def make_inputs(seed, b=2, h=3, q_len=5, k_len=7, d=4):
    rng = np.random.default_rng(seed)
    tensors = [paddle.to_tensor(rng.standard_normal((b, h, n, d)).astype(np.float32), stop_gradient=False)
               for n in (q_len, k_len, k_len)]
    # a causal + left-padding mask: row 0 has two padded keys, every query sees at least one key
    allowed = np.tril(np.ones((q_len, k_len), dtype=bool), k=k_len - q_len)[None].repeat(b, 0)
    allowed[0, :, :2] = False
    allowed[0, :, -1] = True
    bias = paddle.to_tensor(np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None])
    return tensors, bias


@pytest.mark.parametrize("with_bias", [True, False])
def test_numpy_core_matches_paddle_values_and_gradients(with_bias):
    (q, k, v), bias = make_inputs(0)
    bias = bias if with_bias else None
    upstream = paddle.to_tensor(np.random.default_rng(1).standard_normal((2, 3, 5, 4)).astype(np.float32))
    assert attention_module._use_numpy((q, k, v), None)  # this machine is a CPU: the numpy path runs

    ours = attention(q, k, v, 0.5, bias)
    (ours * upstream).sum().backward()
    ours_grads = [t.grad.numpy().copy() for t in (q, k, v)]
    for t in (q, k, v):
        t.clear_gradient()
    ref = paddle_reference(q, k, v, 0.5, bias)
    (ref * upstream).sum().backward()

    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(ours_grads, (t.grad.numpy() for t in (q, k, v))):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def test_no_grad_path_and_frozen_inputs():
    (q, k, v), bias = make_inputs(2)
    with paddle.no_grad():
        np.testing.assert_allclose(attention(q, k, v, 0.3, bias).numpy(),
                                   paddle_reference(q, k, v, 0.3, bias).numpy(), rtol=1e-5, atol=1e-6)
    q.stop_gradient = True  # only k and v need gradients: q's is not computed, the others still are
    attention(q, k, v, 0.3, bias).sum().backward()
    assert q.grad is None and k.grad is not None and v.grad is not None


def test_fully_masked_row_is_uniform_not_nan():
    (q, k, v), _ = make_inputs(3, b=1, h=1, q_len=2, k_len=3)
    bias = paddle.to_tensor(np.array([[[[MASK_VALUE] * 3, [0.0, MASK_VALUE, 0.0]]]], dtype=np.float32))
    out = attention(q, k, v, 1.0, bias).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 0, 0], v.numpy()[0, 0].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_dropout_takes_the_paddle_path():
    (q, k, v), _ = make_inputs(4)
    assert not attention_module._use_numpy((q, k, v), paddle.nn.Dropout(0.1))


def test_numpy_rotary_matches_paddle_values_and_gradients():
    rng = np.random.default_rng(5)
    x = paddle.to_tensor(rng.standard_normal((2, 3, 5, 8)).astype(np.float32), stop_gradient=False)
    freqs = rng.standard_normal((2, 1, 5, 4)).astype(np.float32)
    angles = np.concatenate([freqs, freqs + 0.3], axis=-1)  # halves differ: the backward must not assume they match
    cos, sin = paddle.to_tensor(np.cos(angles)), paddle.to_tensor(np.sin(angles))
    upstream = paddle.to_tensor(rng.standard_normal((2, 3, 5, 8)).astype(np.float32))

    ours = attention_module.rotary(x, cos, sin)
    (ours * upstream).sum().backward()
    ours_grad = x.grad.numpy().copy()
    x.clear_gradient()
    x1, x2 = paddle.split(x, 2, axis=-1)
    ref = x * cos + paddle.concat([-x2, x1], axis=-1) * sin
    (ref * upstream).sum().backward()

    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours_grad, x.grad.numpy(), rtol=1e-5, atol=1e-6)
