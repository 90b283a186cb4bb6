"""The attention core, softmax(q·kᵀ·scale + bias)·v, and the rotary embedding, each one autograd op.

Why: on CPU, Paddle's float32 elementwise kernels are several times slower than numpy's on the same
core (on [16, 2, 390, 390] scores: the broadcast mask add 110 ms against 4 ms, softmax 43 ms against
26 ms, q·kᵀ 41 ms against 21 ms; the whole core in bench/attention.py), and the core is most of the
decoder's prefill and a large share of a training step. So on CPU, in float32 and without attention
dropout, the core runs in numpy (OpenBLAS products, in-place softmax) with a hand-written backward.

Everywhere else (GPU, half precision, or `PADDLE_CAPTION_KERNELS=paddle` / `paddle_kernels()` on
CPU) it is Paddle's fused `scaled_dot_product_attention` — flash attention on a GPU in
float16/bfloat16, whose contract on shapes and dtypes every call is checked against, on a CPU too
(`check_flash_contract`) — which takes every mask this model builds: none (ViT, resampler), causal over a
square score matrix (`is_causal`, training batches without left padding), or the additive mask of
left-padded and cached decoding (`attn_mask`, made finite in the low dtype so a fully masked
padding row stays a harmless uniform row). Attention dropout (off in every Qwen-VL config) takes
the plain expression. On Paddle 3.3's CPU build the fused op runs its "math" backend (the same
products and softmax as the plain expression; layout [B, T, H, D]; float32 — CPU has no bfloat16
matmul). All paths compute the same values and gradients (tests/test_attention.py).

The rotary embedding (x·cos + rotate_half(x)·sin) is six Paddle kernels (split, negate, concat,
two products, a sum) over every q and k; here it is three numpy passes.

Static export (`paddle.jit.to_static`, deploy/export.py): `numpy_capable` is False outside dygraph,
so the dispatch picks Paddle's kernels before any tensor code runs, and the dispatch functions
here are `paddle.jit.not_to_static`: dy2static does not rewrite them (its rewrite of their generator
expressions failed with "no binding for nonlocal 't'"), they run as plain Python while the graph is
traced and record exactly their Paddle ops. That is sound because none of them branches on a
tensor's value, only on Python flags, dtypes and static shapes. Exported attention therefore goes
through `fused_attention` and its `check_flash_contract`, as eager runs with Paddle's kernels do.

The backward uses the row identity Σ_k p·dP = dO·O (as FlashAttention does), so it needs no second
[Q x K] buffer beyond dP itself.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import paddle

from .numpy_bridge import as_numpy, from_numpy, numpy_capable
from .precision import float32_compute

F = paddle.nn.functional

MASK_VALUE = -3.4028234663852886e38  # finfo(float32).min, as PaddleMIX's mask (not -inf: no NaN rows)


@functools.lru_cache(maxsize=8)
def causal_bias_np(q_len: int, k_len: int) -> np.ndarray:
    """[q_len, k_len] additive causal mask: query i (the last q_len of k_len positions) sees keys
    0 .. i + k_len - q_len. Cached and read-only."""
    allowed = np.tril(np.ones((q_len, k_len), dtype=bool), k=k_len - q_len)
    bias = np.where(allowed, np.float32(0), np.float32(MASK_VALUE)).astype(np.float32)
    bias.setflags(write=False)
    return bias


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


@paddle.jit.not_to_static
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


@paddle.jit.not_to_static
def attention(q, k, v, scale: float, bias=None, dropout=None, causal: bool = False):
    """q [B, H, Q, D], k/v [B, H, K, D] -> [B, H, Q, D]. Masking: an additive `bias` broadcastable
    to [B, H, Q, K] (never differentiated), or `causal=True` for the plain causal mask of a forward
    without cache or padding (the fused kernels then apply their own). Softmax runs in float32
    whatever the dtype."""
    if causal and bias is not None:
        raise ValueError("pass either an additive bias or causal=True, not both")
    if _use_numpy((q, k, v), dropout):
        if causal:
            bias_np = causal_bias_np(q.shape[2], k.shape[2])
        else:
            bias_np = None if bias is None else as_numpy(bias.astype("float32"))
        if paddle.is_grad_enabled() and not all(t.stop_gradient for t in (q, k, v)):
            return _NumpyAttention.apply(q, k, v, scale, bias_np)
        out, _ = _numpy_forward(as_numpy(q), as_numpy(k), as_numpy(v), scale, bias_np)
        return from_numpy(out)
    if dropout is None:
        return fused_attention(q, k, v, scale, bias, causal)
    if causal:
        bias = paddle.to_tensor(causal_bias_np(q.shape[2], k.shape[2]))
    return plain_attention(q, k, v, scale, bias, dropout)


@paddle.jit.not_to_static
def fused_attention(q, k, v, scale: float, bias=None, causal: bool = False):
    """`scaled_dot_product_attention` in its [B, T, H, D] layout: the kit's one call into a fused
    attention kernel. Flash attention accepts only the default 1/sqrt(D) scale, so any other scale
    is folded into q first. Every call is checked against flash attention's contract
    (`check_flash_contract`), on a CPU too, so a mask a GPU would refuse fails a CPU test. FlashAttention
    3 (`FLAGS_flash_attn_version=3`, H100) refuses every dense mask: masked calls then take the
    plain expression, which accepts any mask (unmasked ones still go to the fused kernel)."""
    head_dim = q.shape[-1]
    if abs(scale * math.sqrt(head_dim) - 1.0) > 1e-7:
        q = q * (scale * math.sqrt(head_dim))
    mask = None if bias is None else sdpa_mask(bias, q.dtype)
    qt, kt, vt = (t.transpose([0, 2, 1, 3]) for t in (q, k, v))
    check_flash_contract(qt, kt, vt, mask, causal)
    if mask is not None and flash_attn_version() == 3:
        return plain_attention(q, k, v, 1.0 / math.sqrt(head_dim), bias)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal)
    return out.transpose([0, 2, 1, 3])


class FlashContractError(ValueError):
    """A fused-attention call that flash attention on a GPU would refuse."""


@paddle.jit.not_to_static
def check_flash_contract(q, k, v, mask, is_causal: bool) -> None:
    """Refuse, in one line, what Paddle's flash-attention kernel refuses on a GPU (Paddle 3.3 picks
    it for float16/bfloat16 on A100/H100 even when a mask is given), whatever device runs now:
    q/k/v [B, T, H, D] of one dtype, equal batch and heads, k and v of one length; a mask of shape
    [B, 1 or H, 1 or Q, K] (its batch axis is not broadcast: a [1, ...] mask for a batch of 2
    stops the kernel) in q's dtype; never `is_causal` together with a mask; and `is_causal` only
    for a square Q = K (the kernels align a non-square causal mask differently: flash to the bottom
    right, the math backend to the top left)."""
    if not (len(q.shape) == len(k.shape) == len(v.shape) == 4):
        raise FlashContractError(f"fused attention takes 4-D [B, T, H, D] q/k/v, got {q.shape}, {k.shape}, {v.shape}")
    (b, q_len, heads, dim), (kb, k_len, kh, kd) = q.shape, k.shape
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise FlashContractError(f"fused attention needs one dtype for q/k/v, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (kb, kh, kd) != (b, heads, dim) or list(v.shape) != list(k.shape):
        raise FlashContractError(f"fused attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    if mask is None:
        if is_causal and q_len != k_len:
            raise FlashContractError(f"is_causal needs square attention, got Q={q_len}, K={k_len}: pass a mask")
        return
    if is_causal:
        raise FlashContractError("flash attention takes either is_causal or a mask, not both")
    shape = list(mask.shape)
    if len(shape) != 4 or shape[0] != b or shape[1] not in (1, heads) or shape[2] not in (1, q_len) \
            or shape[3] != k_len:
        raise FlashContractError(f"attention mask of shape {shape} breaks flash attention's contract: "
                                 f"expected [{b}, 1 or {heads}, 1 or {q_len}, {k_len}] for batch {b}, "
                                 f"{heads} heads, {q_len} queries, {k_len} keys")
    if mask.dtype != q.dtype:
        raise FlashContractError(f"attention mask dtype {mask.dtype} differs from q's {q.dtype}")


def flash_attn_version() -> int:
    """The flash-attention generation Paddle would run: `FLAGS_flash_attn_version` on a CUDA build
    (3 selects FlashAttention 3 on H100), 2 otherwise (the flag does not exist on a CPU build)."""
    try:
        return int(paddle.get_flags(["FLAGS_flash_attn_version"])["FLAGS_flash_attn_version"])
    except (ValueError, KeyError):
        return 2


@paddle.jit.not_to_static
def sdpa_mask(bias, dtype):
    """The additive mask in the fused op's dtype (it requires q's). finfo(float32).min would round
    to -inf in bfloat16/float16 and turn a fully masked padding row into NaN; finfo(dtype).min
    keeps it a finite, uniform row, as in float32."""
    if bias.dtype == dtype:
        return bias
    lowest = paddle.full([], paddle.finfo(dtype).min, "float32")  # exact in float32; then one cast
    return paddle.where(bias < 0, lowest, paddle.zeros([], "float32")).astype(dtype)


@paddle.jit.not_to_static
def plain_attention(q, k, v, scale: float, bias=None, dropout=None):
    """softmax(q·kᵀ·scale + bias)·v as Paddle kernels, the softmax in float32 (upstream's expression)."""
    scores = paddle.matmul(q * scale, k, transpose_y=True)
    with float32_compute():  # softmax in float32, as upstream (also under O2 autocast)
        if scores.dtype != paddle.float32:
            scores = scores.astype("float32")
        if bias is not None:
            scores = scores + bias
        probs = F.softmax(scores, axis=-1)
    if probs.dtype != q.dtype:
        probs = probs.astype(q.dtype)
    if dropout is not None:
        probs = dropout(probs)
    return paddle.matmul(probs, v)
