"""The QWen decoder (`transformer.llm`): rotary attention, RMSNorm, SwiGLU, KV cache.

Parameter names are PaddleNLP's `QWenModel` (`wte`, `h.{i}.ln_1/attn.c_attn/attn.c_proj/ln_2/
mlp.w1/mlp.w2/mlp.c_proj`, `ln_f`). Positions always come from the attention mask
(`cumsum(mask) - 1`), so left-padded batches and cached decoding put RoPE where it belongs —
PaddleNLP's own cached path gets this wrong when no position ids are passed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import paddle

from .attention import MASK_VALUE, attention, rotary
from .config import MgenVLConfig
from .precision import float32_compute
from .recompute import run_block, should_recompute

nn = paddle.nn
F = paddle.nn.functional


class RMSNorm(nn.Layer):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        with float32_compute():  # normalise in float32, also under O2 autocast (precision.py)
            x32 = x if x.dtype == paddle.float32 else x.astype("float32")
            x32 = x32 * paddle.rsqrt((x32 * x32).mean(-1, keepdim=True) + self.eps)  # x*x: 2x faster than pow on CPU
        return (x32 if self.weight.dtype == paddle.float32 else x32.astype(self.weight.dtype)) * self.weight


class RotaryEmbedding:
    """cos/sin tables for half-rotation RoPE, with Qwen's dynamic-NTK base for long contexts."""

    def __init__(self, dim: int, base: float, seq_length: int, dynamic_ntk: bool):
        self.dim, self.base, self.seq_length, self.dynamic_ntk = dim, base, seq_length, dynamic_ntk
        self._cache = {}

    def ntk_alpha(self, total_len: int) -> float:
        if not self.dynamic_ntk or total_len <= self.seq_length:
            return 1.0
        context = math.log(total_len / self.seq_length, 2) + 1
        return max(2 ** math.ceil(context) - 1, 1)

    def tables(self, max_pos: int, alpha: float):
        """([max_pos, dim] cos, sin) in float32; cached per (length bucket, alpha)."""
        length = max(256, 1 << (max_pos - 1).bit_length())
        key = (length, alpha)
        if key not in self._cache:
            base = self.base * alpha ** (self.dim / (self.dim - 2))
            inv_freq = 1.0 / (base ** (paddle.arange(0, self.dim, 2, dtype="float32") / self.dim))
            freqs = paddle.outer(paddle.arange(length, dtype="float32"), inv_freq)
            emb = paddle.concat([freqs, freqs], axis=-1)
            self._cache = {key: (emb.cos(), emb.sin())}
        return self._cache[key]

    def gather(self, positions, alpha: float, dtype):
        """positions [B, T] -> cos, sin [B, 1, T, dim]."""
        cos_table, sin_table = self.tables(int(positions.max()) + 1, alpha)
        b, t = positions.shape
        flat = positions.reshape([-1])
        cos = paddle.gather(cos_table, flat).reshape([b, 1, t, -1])
        sin = paddle.gather(sin_table, flat).reshape([b, 1, t, -1])
        if dtype != paddle.float32:
            cos, sin = cos.astype(dtype), sin.astype(dtype)
        return cos, sin


def apply_rotary(x, cos, sin, rotary_dim: int):
    """x: [B, H, T, D]; cos/sin: [B, 1, T, rotary_dim]; only the first rotary_dim channels turn."""
    if rotary_dim == x.shape[-1]:
        return rotary(x, cos, sin)
    return paddle.concat([rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], axis=-1)


def take_rows(x, index):
    """x [B, T, ...], index [B, Q] -> [B, Q, ...] (per-row gather along the sequence axis)."""
    shape = index.shape + x.shape[2:]
    expanded = index.reshape(index.shape + [1] * (len(x.shape) - 2)).expand(shape)
    return paddle.take_along_axis(x, expanded, axis=1)


@dataclass
class AttentionInputs:
    """What every layer shares in one forward: rotary tables, mask bias, and the query subset."""

    cos: object  # [B, 1, T, rot] for all positions of this forward
    sin: object
    bias: object  # additive mask [B, 1, Q, past+T], or None with causal=True
    logn: object = None  # [1, 1, T, 1] or None
    query_index: object = None  # [B, Q] positions (within this forward) the last layer must output
    q_cos: object = None
    q_sin: object = None
    q_logn: object = None
    causal: bool = False  # the mask is plain causal over a square T x T (no cache, no left padding)


class QWenAttention(nn.Layer):
    def __init__(self, cfg: MgenVLConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias_attr=False if cfg.no_bias else None)
        self.attn_dropout = nn.Dropout(cfg.attn_dropout_prob) if cfg.attn_dropout_prob > 0 else None

    def _heads(self, x):  # [B, T, C] -> [B, H, T, D]
        return x.reshape([0, 0, self.heads, self.head_dim]).transpose([0, 2, 1, 3])

    def forward(self, x, shared: AttentionInputs, past=None, use_cache=False, restrict_queries=False):
        q, k, v = paddle.split(self.c_attn(x), 3, axis=-1)  # c_attn holds Q|K|V blocks
        cos, sin, logn = shared.cos, shared.sin, shared.logn
        if restrict_queries:  # only the rows whose output is needed ask a query
            q = take_rows(q, shared.query_index)
            q_cos, q_sin, logn = shared.q_cos, shared.q_sin, shared.q_logn
        else:
            q_cos, q_sin = cos, sin
        q = apply_rotary(self._heads(q), q_cos, q_sin, self.rotary_dim)
        k = apply_rotary(self._heads(k), cos, sin, self.rotary_dim)
        v = self._heads(v)
        if past is not None:
            k = paddle.concat([past[0], k], axis=2)
            v = paddle.concat([past[1], v], axis=2)
        present = (k, v) if use_cache else None
        if logn is not None:
            q = q * logn
        out = attention(q, k, v, 1.0 / math.sqrt(self.head_dim), shared.bias, self.attn_dropout,
                        causal=shared.causal)
        out = out.transpose([0, 2, 1, 3])
        return self.c_proj(out.reshape([0, 0, self.heads * self.head_dim])), present


class QWenMLP(nn.Layer):
    """SwiGLU: c_proj(w1(x) * silu(w2(x))) — w2 is the gate, the MLP width is intermediate_size // 2."""

    def __init__(self, cfg: MgenVLConfig):
        super().__init__()
        width = cfg.intermediate_size // 2
        bias = False if cfg.no_bias else None
        self.w1 = nn.Linear(cfg.hidden_size, width, bias_attr=bias)
        self.w2 = nn.Linear(cfg.hidden_size, width, bias_attr=bias)
        self.c_proj = nn.Linear(width, cfg.hidden_size, bias_attr=bias)

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Layer):
    def __init__(self, cfg: MgenVLConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = QWenMLP(cfg)

    def forward(self, x, shared: AttentionInputs, past=None, use_cache=False, restrict_queries=False):
        attn_out, present = self.attn(self.ln_1(x), shared, past, use_cache, restrict_queries)
        if restrict_queries:
            x = take_rows(x, shared.query_index)
        x = x + attn_out
        return x + self.mlp(self.ln_2(x)), present

    def hidden_states(self, x, shared: AttentionInputs, restrict_queries=False):
        """The block's output without a cache (training): what recompute checkpoints."""
        return self(x, shared, None, False, restrict_queries)[0]


class QWenModel(nn.Layer):
    """Embeddings are computed by the caller (so image features can be scattered in first)."""

    def __init__(self, cfg: MgenVLConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.emb_dropout_prob) if cfg.emb_dropout_prob > 0 else None
        self.h = nn.LayerList([QWenBlock(cfg) for _ in range(cfg.num_hidden_layers)])
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rotary_emb_base, cfg.seq_length,
                                      cfg.use_dynamic_ntk)
        # Activation checkpointing per layer in training (recompute.py); a runtime switch, not part
        # of the architecture: MgenVLForCausalLM.enable_recompute() / TrainConfig.recompute.
        self.recompute = False

    def embed_tokens(self, input_ids):
        embeds = self.wte(input_ids)
        return self.drop(embeds) if self.drop is not None else embeds

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, output_index=None):
        """inputs_embeds [B, T, C]; attention_mask [B, past+T] of 1/0 (None = all ones).

        `output_index` [B, Q] (training): only these positions' final hidden states are wanted,
        so the last layer computes queries, attention output and MLP for them alone — exact, and
        for a 2-layer model it removes a third of the decoder's work.
        Returns (hidden [B, T or Q, C], presents or None).
        """
        b, t, _ = inputs_embeds.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        total = past_len + t
        mask_np = None if attention_mask is None else attention_mask.numpy()
        if position_ids is None:
            if mask_np is None:
                position_ids = paddle.arange(past_len, total, dtype="int64").unsqueeze(0).expand([b, t])
            else:
                position_ids = positions_from_mask(attention_mask)[:, past_len:]
        # Right padding (or none) needs no key mask: causal masking already hides trailing pads
        # from every real query, and the broadcast [1, 1, T, T] bias is cheaper.
        key_mask = None if mask_np is None or _is_right_padded(mask_np) else attention_mask
        alpha = self.rotary.ntk_alpha(total)
        cos, sin = self.rotary.gather(position_ids, alpha, inputs_embeds.dtype)
        logn = self._logn(past_len, total, inputs_embeds.dtype)
        if past_len == 0 and key_mask is None:  # plain causal: the kernels build (or fuse) the mask
            every = AttentionInputs(cos, sin, None, logn, causal=True)
        else:
            # one row per batch row even when no row is padded: flash attention does not broadcast
            # a mask's batch axis (attention.check_flash_contract)
            q_abs = paddle.arange(past_len, total, dtype="int64").unsqueeze(0).expand([b, t])
            every = AttentionInputs(cos, sin, attention_bias(q_abs, total, key_mask), logn)
        last = every
        if output_index is not None:
            q_cos, q_sin = self.rotary.gather(
                paddle.take_along_axis(position_ids, output_index, axis=1), alpha, inputs_embeds.dtype)
            q_logn = None
            if logn is not None:
                q_logn = take_rows(logn.reshape([1, -1, 1]).expand([b, t, 1]), output_index)
                q_logn = q_logn.reshape([b, 1, -1, 1])
            last = AttentionInputs(cos, sin, attention_bias(output_index + past_len, total, key_mask),
                                   logn, output_index, q_cos, q_sin, q_logn)

        x, presents = inputs_embeds, []
        for i, block in enumerate(self.h):
            past = None if past_key_values is None else past_key_values[i]
            is_last = i == len(self.h) - 1
            shared, restrict = (last if is_last else every), is_last and output_index is not None
            if not use_cache and past is None and should_recompute(x, self.recompute and self.training):
                x, present = run_block(block.hidden_states, x, shared, restrict, recompute=True), None
            else:
                x, present = block(x, shared, past, use_cache, restrict_queries=restrict)
            presents.append(present)
        return self.ln_f(x), (presents if use_cache else None)

    def _logn(self, past_len: int, total: int, dtype):
        """Qwen's log-n query scaling; it only touches positions beyond seq_length."""
        if not self.config.use_logn_attn or total <= self.config.seq_length:
            return None
        pos = paddle.arange(past_len + 1, total + 1, dtype="float32")
        scale = paddle.maximum(paddle.log(pos) / math.log(self.config.seq_length), paddle.ones_like(pos))
        return scale.reshape([1, 1, -1, 1]).astype(dtype)


def _is_right_padded(mask_np) -> bool:
    return bool((mask_np[:, 1:] <= mask_np[:, :-1]).all())


def positions_from_mask(attention_mask):
    """Position of every token counted over real tokens only, so left padding does not shift RoPE."""
    return paddle.clip(paddle.cumsum(attention_mask.astype("int64"), axis=-1) - 1, min=0)


def attention_bias(query_abs, total: int, key_mask=None):
    """Additive float mask [B, 1, Q, total] for `query_abs` [B, Q]: query at key-axis index i sees
    keys 0..i (and, with `key_mask` [B, total], only real tokens).

    Masked entries hold finfo(float32).min rather than -inf, so an all-masked (padding) query row
    softmaxes to a harmless uniform row instead of NaN.
    """
    k_pos = paddle.arange(total, dtype="int64").reshape([1, 1, -1])
    allowed = k_pos <= query_abs.unsqueeze(-1)  # [B, Q, total]
    if key_mask is not None:
        allowed = paddle.logical_and(allowed, key_mask.astype("bool").unsqueeze(1))
    zeros = paddle.zeros_like(allowed, dtype="float32")  # not zeros(allowed.shape): traceable (deploy/)
    return paddle.where(allowed, zeros, paddle.full_like(zeros, MASK_VALUE)).unsqueeze(1)
