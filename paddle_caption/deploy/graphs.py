"""The three graphs a model is exported as, each a `paddle.nn.Layer` over the model's own sublayers.

- `VisionGraph`:  images [N, 3, S, S] -> image features [N, n_queries, hidden] (ViT + resampler).
- `PrefillGraph`: input_ids [B, T], attention_mask [B, T], attention_bias [B, 1, T, T], image_rows
                  [N * Q], image_features [N, Q, C] -> last-position hidden state [B, 1, C], then
                  k, v of every layer [B, H, T, D].
                  Row r of the flattened [B * T] embeddings takes feature row r; index B * T is a
                  scratch row (a batch without images passes one zero span aimed at it).
- `DecodeGraph`:  input_ids [B, T >= 1], attention_mask [B, P + T], attention_bias [B, 1, T, P + T],
                  k, v of every layer [B, H, P, D]
                  -> hidden states [B, T, C] (every fed position: speculative verification needs
                  them all), then the new k, v [B, H, P + T, D].

The output layer (lm_head) is not in the graphs: inside them oneDNN's [rows x hidden] x [hidden x
151936] product took ~27 of a 39 ms decode step (tiny model, batch 16), where the kit's numpy head
over a transposed copy of the weight (decoding/output_head.py) takes ~10 ms. The export writes the
weight as `lm_head.npy` and the engine applies it to the rows it needs (deploy/engine.py).

Why separate forwards instead of `MgenVLForCausalLM.forward`: the eager forward reads the mask in
numpy (`.numpy()`, to skip the key mask of right-padded batches), finds the image spans in numpy,
caches rotary tables in Python by length and switches Qwen's dynamic NTK / log-n scaling on by
sequence length. A traced graph cannot do any of that per call. Here every such decision is fixed
to what holds while `total <= seq_length` (NTK alpha 1, no log-n; the engine refuses longer inputs
in one line), the mask always goes in as an additive bias, built by the engine in numpy and fed
as an input (`engine.mask_bias`: the values `qwen.attention_bias` gives; built inside the graph with
Paddle's broadcasting less_equal / logical_and / where it took ~60 of a 122 ms prefill at batch 16,
profiled with `Config.enable_profile()`), the attention_mask still gives the positions, the rotary
tables are computed from the positions inside the graph (the same float32 products as the cached
table), and the image span rows are found by the caller (the engine checks
them as `MgenVLForCausalLM.image_span_rows` does) and passed in. The decoder blocks themselves are
the model's (`QWenBlock`), so parameter names and arithmetic are the eager model's.
"""
from __future__ import annotations

import paddle

from ..model.qwen import AttentionInputs, positions_from_mask

nn = paddle.nn


class VisionGraph(nn.Layer):
    def __init__(self, model):
        super().__init__()
        self.visual = model.visual

    def forward(self, images):
        return self.visual(images)


class _DecoderGraph(nn.Layer):
    """The decoder part shared by prefill and decode: embeddings, blocks, final norm."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        llm = model.transformer.llm
        self.wte, self.blocks, self.ln_f = llm.wte, llm.h, llm.ln_f
        rot = llm.rotary
        # alpha = 1 (total <= seq_length): the base of RotaryEmbedding.tables, as a saved buffer
        inv_freq = 1.0 / (rot.base ** (paddle.arange(0, rot.dim, 2, dtype="float32") / rot.dim))
        self.register_buffer("inv_freq", inv_freq, persistable=True)
        self.num_layers = cfg.num_hidden_layers

    def rotary(self, positions):
        """positions [B, T] -> cos, sin [B, 1, T, rot] (RotaryEmbedding.gather at alpha 1)."""
        freqs = positions.astype("float32").unsqueeze(-1) * self.inv_freq
        emb = paddle.concat([freqs, freqs], axis=-1).unsqueeze(1)
        return emb.cos(), emb.sin()

    def run_blocks(self, embeds, attention_mask, bias, past, last_only: bool):
        """embeds [B, T, C], attention_mask [B, P + T], bias [B, 1, T, P + T] (additive),
        past: per layer (k, v) or None. Returns (hidden [B, 1 or T, C], flat list k0, v0, k1, ...)."""
        t = paddle.shape(embeds)[1]
        total = paddle.shape(attention_mask)[1]
        past_len = total - t
        positions = positions_from_mask(attention_mask)
        positions = paddle.slice(positions, axes=[1], starts=[past_len], ends=[total])
        cos, sin = self.rotary(positions)
        every = AttentionInputs(cos, sin, bias)
        last = every
        if last_only:
            b = paddle.shape(embeds)[0]
            q_all = paddle.arange(t, dtype="int64").unsqueeze(0).expand(paddle.stack([b, t]))
            q_last = paddle.slice(q_all, axes=[1], starts=[t - 1], ends=[t])  # [B, 1]: the last position
            q_cos, q_sin = self.rotary(paddle.slice(positions, axes=[1], starts=[t - 1], ends=[t]))
            last = AttentionInputs(cos, sin, paddle.slice(bias, axes=[2], starts=[t - 1], ends=[t]),
                                   query_index=q_last, q_cos=q_cos, q_sin=q_sin)
        x, presents = embeds, []
        for i, block in enumerate(self.blocks):
            is_last = i == self.num_layers - 1
            shared = last if is_last else every
            layer_past = None if past is None else (past[2 * i], past[2 * i + 1])
            x, present = block(x, shared, layer_past, True, last_only and is_last)
            presents.extend(present)
        return self.ln_f(x), presents


class PrefillGraph(_DecoderGraph):
    def __init__(self, model):
        super().__init__(model)
        self.ablate_images = bool(model.config.ablate_images)

    def forward(self, input_ids, attention_mask, attention_bias, image_rows, image_features):
        embeds = self.wte(input_ids)
        hidden_size = embeds.shape[-1]
        features = image_features.reshape([-1, hidden_size])
        if self.ablate_images:
            features = paddle.zeros_like(features)
        flat = embeds.reshape([-1, hidden_size])
        # One scratch row after the last: a batch without images scatters a zero span into it
        # (Paddle Inference 3.3 refuses zero-size inputs), and it is cut off again.
        flat = paddle.concat([flat, paddle.zeros_like(flat[:1])])
        flat = paddle.scatter(flat, image_rows, features, overwrite=True)[:-1]
        embeds = flat.reshape(paddle.shape(embeds))
        hidden, presents = self.run_blocks(embeds, attention_mask, attention_bias, None, last_only=True)
        return [hidden] + presents


class DecodeGraph(_DecoderGraph):
    def forward(self, input_ids, attention_mask, attention_bias, past):
        hidden, presents = self.run_blocks(self.wte(input_ids), attention_mask, attention_bias, past,
                                           last_only=False)
        return [hidden] + presents
