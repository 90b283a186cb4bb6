"""lm_head + cross-entropy on the supervised rows, as one autograd op.

Why: with the real 151,936-token vocabulary the output layer is most of a small model's training
step — three [rows x hidden x vocab] matrix products (logits, d_hidden, d_weight) plus a softmax
over every row. On CPU, Paddle's fp32 matmul runs at roughly a third of the speed numpy's
OpenBLAS reaches on the same core (docs/benchmarks.md), so on CPU this op does the three products
and the softmax in numpy, in place, keeping only one [rows x vocab] buffer. On GPU the plain Paddle
path is used. Both compute the same mean cross-entropy and the same gradients (tested).

`linear_target_logprobs` is the same head without the mean and without autograd: the log-probability
of each row's target, for scoring captions (data curation's image-text consistency). Numpy on CPU,
Paddle elsewhere, the same values (tested).

Tensors cross between Paddle and numpy without copying (`numpy_bridge.py`). Inference logits
(generation, evaluation) use the same numpy product; while decoding, `project` may take the
transposed-weight route of `decoding/output_head.py` for few rows.
"""
from __future__ import annotations

import numpy as np
import paddle

from ..decoding.output_head import few_rows_logits
from .numpy_bridge import as_numpy, from_numpy, numpy_capable
from .precision import float32_compute

F = paddle.nn.functional


class _NumpyLinearCrossEntropy(paddle.autograd.PyLayer):
    """loss = mean_i CE(hidden_i @ weight, target_i); weight is [hidden, vocab] (Paddle's Linear)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets: np.ndarray):
        h = as_numpy(hidden)
        w = as_numpy(weight)
        probs, target_logprob = _softmax_and_target_logprob(h, w, targets)
        loss = float(-np.mean(target_logprob))
        ctx.saved = (h, w, probs, targets)
        ctx.needs = (not hidden.stop_gradient, not weight.stop_gradient)  # frozen head: no d_weight
        return paddle.to_tensor(np.float32(loss))

    @staticmethod
    def backward(ctx, grad):
        h, w, probs, targets = ctx.saved
        ctx.saved = None
        probs[np.arange(len(targets)), targets] -= 1.0  # d loss / d logits = (softmax - onehot) / N
        probs *= float(grad.numpy()) / len(targets)
        need_hidden, need_weight = ctx.needs
        d_hidden = from_numpy(probs @ w.T) if need_hidden else None
        d_weight = from_numpy(h.T @ probs) if need_weight else None
        return d_hidden, d_weight


def _softmax_and_target_logprob(h: np.ndarray, w: np.ndarray, targets: np.ndarray):
    """(softmax(h @ w) [rows x vocab], log-probability of each row's target [rows]), with one
    [rows x vocab] buffer: the logits are turned into probabilities in place."""
    rows = np.arange(len(targets))
    probs = h @ w
    probs -= probs.max(axis=1, keepdims=True)
    target_logit = probs[rows, targets].copy()
    np.exp(probs, out=probs)
    total = probs.sum(axis=1, keepdims=True)
    probs /= total
    return probs, target_logit - np.log(total[:, 0])


def use_numpy_head(linear) -> bool:
    """The numpy path serves plain float32 bias-free Linear heads on CPU."""
    return type(linear) is paddle.nn.Linear and linear.bias is None and numpy_capable(linear.weight)


def linear_cross_entropy(rows, linear, targets: np.ndarray):
    """Mean cross-entropy of `linear(rows)` against int targets (no ignored entries)."""
    if use_numpy_head(linear):
        return _NumpyLinearCrossEntropy.apply(rows.astype("float32"), linear.weight,
                                              np.ascontiguousarray(targets, dtype=np.int64))
    return cross_entropy(linear(rows), paddle.to_tensor(targets))


def linear_target_logprobs(rows, linear, targets: np.ndarray) -> np.ndarray:
    """log softmax(linear(rows))[i, targets[i]] for every row i, as float32 numpy [rows]; no autograd."""
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    if use_numpy_head(linear):
        with paddle.no_grad():
            h = as_numpy(rows.astype("float32"))
        return _softmax_and_target_logprob(h, as_numpy(linear.weight), targets)[1].astype(np.float32)
    return paddle_target_logprobs(rows, linear, targets)


def paddle_target_logprobs(rows, linear, targets: np.ndarray) -> np.ndarray:
    """The Paddle path of `linear_target_logprobs` (GPU, or a head the numpy path does not serve)."""
    with paddle.no_grad():
        logprobs = F.log_softmax(linear(rows).astype("float32"), axis=-1)
        index = paddle.to_tensor(np.asarray(targets, dtype=np.int64).reshape(-1, 1))
        return paddle.take_along_axis(logprobs, index, axis=1).reshape([-1]).numpy()


def project(hidden, linear):
    """`linear(hidden)`; on CPU without autograd (generation, evaluation) as one numpy product."""
    needs_grad = paddle.is_grad_enabled() and not (hidden.stop_gradient and linear.weight.stop_gradient)
    if needs_grad or not use_numpy_head(linear):
        return linear(hidden)
    width = hidden.shape[-1]
    flat = as_numpy(hidden.astype("float32").reshape([-1, width]))
    few = few_rows_logits(flat, linear)
    logits = from_numpy(few if few is not None else flat @ as_numpy(linear.weight))
    return logits.reshape([*hidden.shape[:-1], logits.shape[-1]])


def cross_entropy(logits, targets):
    with float32_compute():  # the loss in float32, also under O2 autocast (precision.py)
        return F.cross_entropy(logits.astype("float32"), targets.unsqueeze(-1), reduction="mean")
