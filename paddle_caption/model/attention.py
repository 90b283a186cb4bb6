"""The attention core, softmax(q·kᵀ·scale + bias)·v, and the rotary embedding, each one autograd op.

Why: on CPU, Paddle's float32 elementwise kernels are several times slower than numpy's on the same
core (on [16, 2, 390, 390] scores: the broadcast mask add 110 ms against 4 ms, softmax 43 ms against
26 ms, q·kᵀ 41 ms against 21 ms; the whole core in bench/attention.py), and the core is most of the
decoder's prefill and a large share of a training step. So on CPU, in float32 and without attention
dropout, the core runs in numpy (OpenBLAS products, in-place softmax) with a hand-written backward;
everywhere else (GPU, half precision, dropout) it is the plain Paddle expression. Both compute the
same values and gradients (tests/test_attention.py).

The rotary embedding (x·cos + rotate_half(x)·sin) is six Paddle kernels (split, negate, concat,
two products, a sum) over every q and k; here it is three numpy passes.

The backward uses the row identity Σ_k p·dP = dO·O (as FlashAttention does), so it needs no second
[Q x K] buffer beyond dP itself.
"""
from __future__ import annotations

import numpy as np
import paddle

from .numpy_bridge import as_numpy, from_numpy, numpy_capable

F = paddle.nn.functional


def _numpy_forward(q, k, v, scale: float, bias):
    """Returns (out [..., Q, D], probs [..., Q, K]) for numpy q [..., Q, D], k/v [..., K, D]."""
    probs = np.matmul(q * np.float32(scale), np.swapaxes(k, -1, -2))
    if bias is not None:
        probs += bias
    probs -= probs.max(axis=-1, keepdims=True)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.matmul(probs, v), probs


class _NumpyAttention(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, bias):
        qn, kn, vn = as_numpy(q), as_numpy(k), as_numpy(v)
        out, probs = _numpy_forward(qn, kn, vn, scale, bias)
        ctx.saved = (qn, kn, vn, out, probs, scale)
        ctx.needs = tuple(not t.stop_gradient for t in (q, k, v))
        return from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, probs, scale = ctx.saved
        ctx.saved = None
        d_out = as_numpy(grad_out)
        need_q, need_k, need_v = ctx.needs
        d_v = np.matmul(np.swapaxes(probs, -1, -2), d_out) if need_v else None
        d_scores = np.matmul(d_out, np.swapaxes(v, -1, -2))  # dP, turned into dS in place
        d_scores -= (d_out * out).sum(axis=-1, keepdims=True)
        d_scores *= probs
        d_scores *= np.float32(scale)
        d_q = np.matmul(d_scores, k) if need_q else None
        d_k = np.matmul(np.swapaxes(d_scores, -1, -2), q) if need_k else None
        return tuple(None if g is None else from_numpy(g) for g in (d_q, d_k, d_v))


def _numpy_rotary(x, cos, sin, transpose: bool = False):
    """x·cos + R(x)·sin with R(x) = [-x2, x1]; `transpose` applies Rᵀ(z) = [z2, -z1] instead
    (the backward: d x = g·cos + Rᵀ(g·sin))."""
    half = x.shape[-1] // 2
    out = x * cos
    if transpose:
        scaled = x * sin
        out[..., :half] += scaled[..., half:]
        out[..., half:] -= scaled[..., :half]
    else:
        out[..., :half] -= x[..., half:] * sin[..., :half]
        out[..., half:] += x[..., :half] * sin[..., half:]
    return out


class _NumpyRotary(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.saved = (cos, sin)
        return from_numpy(_numpy_rotary(as_numpy(x), cos, sin))

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved
        ctx.saved = None
        return from_numpy(_numpy_rotary(as_numpy(grad), cos, sin, transpose=True))


def rotary(x, cos, sin):
    """Half-rotation RoPE over the whole last axis: x [B, H, T, D], cos/sin [B or 1, 1, T, D]."""
    if _use_numpy((x, cos, sin), None):
        cos_np, sin_np = as_numpy(cos), as_numpy(sin)
        if paddle.is_grad_enabled() and not x.stop_gradient:
            return _NumpyRotary.apply(x, cos_np, sin_np)
        return from_numpy(_numpy_rotary(as_numpy(x), cos_np, sin_np))
    x1, x2 = paddle.split(x, 2, axis=-1)
    return x * cos + paddle.concat([-x2, x1], axis=-1) * sin


def _use_numpy(tensors, dropout) -> bool:
    return dropout is None and numpy_capable(*tensors)


def attention(q, k, v, scale: float, bias=None, dropout=None):
    """q [B, H, Q, D], k/v [B, H, K, D], optional additive `bias` broadcastable to [B, H, Q, K]
    (a mask, never differentiated) -> [B, H, Q, D]. Softmax runs in float32 whatever the dtype."""
    if _use_numpy((q, k, v), dropout):
        bias_np = None if bias is None else as_numpy(bias.astype("float32"))
        if paddle.is_grad_enabled() and not all(t.stop_gradient for t in (q, k, v)):
            return _NumpyAttention.apply(q, k, v, scale, bias_np)
        out, _ = _numpy_forward(as_numpy(q), as_numpy(k), as_numpy(v), scale, bias_np)
        return from_numpy(out)
    scores = paddle.matmul(q * scale, k, transpose_y=True)
    if scores.dtype != paddle.float32:  # softmax in float32, as upstream
        scores = scores.astype("float32")
    if bias is not None:
        scores = scores + bias
    probs = F.softmax(scores, axis=-1)
    if probs.dtype != q.dtype:
        probs = probs.astype(q.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return paddle.matmul(probs, v)
