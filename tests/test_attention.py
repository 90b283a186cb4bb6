"""The attention core and RoPE: every kernel path equals the plain Paddle expression, values and
gradients — the numpy CPU op, and (off the numpy path, as on a GPU) Paddle's fused
`scaled_dot_product_attention` — with no mask, a causal mask and left padding."""
from __future__ import annotations

import numpy as np
import pytest

from paddle_caption.model import attention as attention_module
from paddle_caption.model.attention import attention, causal_bias_np, plain_attention
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


def values_and_grads(fn, q, k, v, upstream):
    for t in (q, k, v):
        t.clear_gradient()
    out = fn(q, k, v)
    (out * upstream).sum().backward()
    return out.numpy(), [t.grad.numpy().copy() for t in (q, k, v)]


@pytest.mark.parametrize("mask", ["none", "causal", "left_padded"])
@pytest.mark.parametrize("scale", [0.5, 0.3])  # 0.5 = 1/sqrt(d), the fused op's own; 0.3 is folded into q
def test_attention_matches_the_plain_expression(kernels, mask, scale):
    square = mask == "causal"
    (q, k, v), padded = make_inputs(0, q_len=7 if square else 5)
    bias = {"none": None, "causal": None, "left_padded": padded}[mask]
    reference_bias = paddle.to_tensor(causal_bias_np(7, 7)) if square else bias
    upstream = paddle.to_tensor(np.random.default_rng(1).standard_normal(q.shape).astype(np.float32))
    # the path really taken: numpy on a CPU by default, the fused op under paddle_kernels()
    assert attention_module._use_numpy((q, k, v), None) == (kernels == "numpy")

    ours, ours_grads = values_and_grads(lambda *t: attention(*t, scale, bias, causal=square), q, k, v, upstream)
    ref, ref_grads = values_and_grads(lambda *t: paddle_reference(*t, scale, reference_bias), q, k, v, upstream)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(ours_grads, ref_grads):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def test_no_grad_path_and_frozen_inputs(kernels):
    (q, k, v), bias = make_inputs(2)
    with paddle.no_grad():
        np.testing.assert_allclose(attention(q, k, v, 0.3, bias).numpy(),
                                   paddle_reference(q, k, v, 0.3, bias).numpy(), rtol=1e-5, atol=1e-6)
    q.stop_gradient = True  # only k and v need gradients: q's is not computed, the others still are
    attention(q, k, v, 0.3, bias).sum().backward()
    assert q.grad is None and k.grad is not None and v.grad is not None


def test_fully_masked_row_is_uniform_not_nan(kernels):
    (q, k, v), _ = make_inputs(3, b=1, h=1, q_len=2, k_len=3)
    bias = paddle.to_tensor(np.array([[[[MASK_VALUE] * 3, [0.0, MASK_VALUE, 0.0]]]], dtype=np.float32))
    out = attention(q, k, v, 1.0, bias).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 0, 0], v.numpy()[0, 0].mean(axis=0), rtol=1e-5, atol=1e-6)


def test_low_precision_mask_stays_finite():
    """The fused op takes its mask in q's dtype; float32's min would become -inf in bfloat16."""
    _, bias = make_inputs(4)
    for dtype in ("bfloat16", "float16"):
        mask = attention_module.sdpa_mask(bias, getattr(paddle, dtype)).astype("float32").numpy()
        assert np.isfinite(mask).all()
        assert ((mask < 0) == (bias.numpy() < 0)).all() and mask.min() == float(paddle.finfo(getattr(paddle, dtype)).min)


def test_dropout_takes_the_plain_expression(monkeypatch):
    (q, k, v), _ = make_inputs(4)
    assert not attention_module._use_numpy((q, k, v), paddle.nn.Dropout(0.1))
    called = []
    monkeypatch.setattr(attention_module, "plain_attention", lambda *a: called.append(a) or plain_attention(*a))
    monkeypatch.setattr(attention_module, "fused_attention", lambda *a: pytest.fail("dropout must not fuse"))
    attention(q, k, v, 0.5, causal=True, dropout=paddle.nn.Dropout(0.0))
    assert called and called[0][4] is not None  # the causal bias, built for the plain expression


def test_causal_bias_sees_the_diagonal_of_the_last_queries():
    bias = causal_bias_np(2, 4)  # two new queries at positions 2 and 3 of 4
    np.testing.assert_array_equal(bias == 0, [[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError):
        bias[0, 0] = 1.0  # cached and shared: read-only


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


def test_kernel_switch_by_environment(monkeypatch):
    from paddle_caption.model.numpy_bridge import KERNELS_ENV, numpy_capable, paddle_kernels
    from paddle_caption.runtime import UserError

    x = paddle.ones([2])
    assert numpy_capable(x)
    monkeypatch.setenv(KERNELS_ENV, "paddle")
    assert not numpy_capable(x)
    monkeypatch.setenv(KERNELS_ENV, "numpy")
    with paddle_kernels():
        assert not numpy_capable(x)
    assert numpy_capable(x)
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(UserError, match="PADDLE_CAPTION_KERNELS"):
        numpy_capable(x)
