"""The vision tower: ViT -> resampler (256 learned queries) -> ln_post -> proj.

Parameter names follow PaddleMIX `qwen_vl` (`visual.vit.*`, `visual.attn_pool.*`, `visual.ln_post`,
`visual.proj`) so real checkpoints load by name. Linear weights are Paddle's `[in, out]`.
"""
from __future__ import annotations

import math

import numpy as np
import paddle

from ..runtime import UserError
from .attention import attention
from .config import VisualConfig
from .recompute import run_block

nn = paddle.nn
F = paddle.nn.functional

LN_EPS = 1e-6


def resize_pos_embed(pos: "paddle.Tensor", grid: int) -> "paddle.Tensor":
    """[S*S, C] table -> [grid*grid, C], bicubic (a=-0.75, align_corners=False) as Qwen-VL's get_abs_pos."""
    src = int(math.isqrt(pos.shape[0]))
    if src == grid:
        return pos
    dtype = pos.dtype
    # No cast when already float32: Paddle Inference 3.3's constant folding fails on a same-dtype
    # cast of a parameter in an exported graph ("Tensor holds no memory", deploy/).
    table = pos if dtype == paddle.float32 else pos.astype("float32")
    table = table.reshape([1, src, src, -1]).transpose([0, 3, 1, 2])
    table = F.interpolate(table, size=[grid, grid], mode="bicubic", align_corners=False)
    table = table.transpose([0, 2, 3, 1]).reshape([grid * grid, -1])
    return table if dtype == paddle.float32 else table.astype(dtype)


def sincos_2d_table(dim: int, grid: int) -> np.ndarray:
    """The 2-D sin-cos position table ([grid*grid, dim]) Qwen-VL initialises the resampler with."""

    def one_axis(d, positions):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    table = np.concatenate([one_axis(dim // 2, gh), one_axis(dim // 2, gw)], axis=1)
    return table.astype(np.float32)


class VisualAttention(nn.Layer):
    """ViT self-attention. The fused in_proj is laid out per head as [q|k|v] (Megatron style)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):  # x: [B, L, W]
        b, length, width = x.shape
        qkv = self.in_proj(x).reshape([b, length, self.heads, 3 * self.head_dim])
        q, k, v = paddle.split(qkv, 3, axis=-1)  # each [B, L, H, D]
        q, k, v = (t.transpose([0, 2, 1, 3]) for t in (q, k, v))
        out = attention(q, k, v, 1.0 / math.sqrt(self.head_dim))
        out = out.transpose([0, 2, 1, 3]).reshape([b, length, width])
        return self.out_proj(out)


class VisualMLP(nn.Layer):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate=False))


class VisualBlock(nn.Layer):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, epsilon=LN_EPS)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, epsilon=LN_EPS)
        self.mlp = VisualMLP(width, mlp_width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformer(nn.Layer):
    def __init__(self, cfg: VisualConfig):
        super().__init__()
        self.resblocks = nn.LayerList(
            [VisualBlock(cfg.width, cfg.heads, cfg.mlp_width) for _ in range(cfg.layers)])
        self.recompute = False  # activation checkpointing per ViT layer in training (recompute.py)

    def forward(self, x):
        for block in self.resblocks:
            x = run_block(block, x, recompute=self.recompute and self.training)
        return x


class VisionTransformer(nn.Layer):
    """Patch embedding + position table (always 16x16, resized to the grid) + pre-LN transformer."""

    def __init__(self, cfg: VisualConfig):
        super().__init__()
        self.grid = cfg.grid
        self.conv1 = nn.Conv2D(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias_attr=False)
        self.positional_embedding = self.create_parameter(
            [256, cfg.width], default_initializer=nn.initializer.Normal(std=cfg.width ** -0.5))
        self.ln_pre = nn.LayerNorm(cfg.width, epsilon=LN_EPS)
        self.transformer = VisualTransformer(cfg)

    def forward(self, images):  # [N, 3, S, S] -> [N, grid*grid, width]
        x = self.conv1(images)
        x = x.flatten(2).transpose([0, 2, 1])
        x = x + resize_pos_embed(self.positional_embedding, self.grid)
        return self.transformer(self.ln_pre(x))


class ResamplerAttention(nn.Layer):
    """Cross-attention with torch-style packed weights: in_proj_weight [D, 3D] holds Q|K|V blocks."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.in_proj_weight = self.create_parameter(
            [dim, 3 * dim], default_initializer=nn.initializer.XavierUniform())
        self.in_proj_bias = self.create_parameter(
            [3 * dim], is_bias=True, default_initializer=nn.initializer.Constant(0.0))
        self.out_proj = nn.Linear(dim, dim)

    def _project(self, x, part: int):
        dim = self.in_proj_weight.shape[0]
        w = self.in_proj_weight[:, part * dim:(part + 1) * dim]
        b = self.in_proj_bias[part * dim:(part + 1) * dim]
        # The bias is added after the split into heads (the same sums): Paddle Inference 3.3.1 runs
        # `(x @ w + b).reshape(...)` with a sliced bias wrongly (garbage, NaN) once the batch grows
        # again after a smaller one (tests/test_deploy.py, batch sizes 4, 2, 4).
        y = paddle.matmul(x, w).reshape([0, 0, self.heads, self.head_dim]) + b.reshape([self.heads, self.head_dim])
        return y.transpose([0, 2, 1, 3])

    def forward(self, query, key, value):  # [B, Lq, D], [B, Lk, D], [B, Lk, D]
        q, k, v = self._project(query, 0), self._project(key, 1), self._project(value, 2)
        out = attention(q, k, v, 1.0 / math.sqrt(self.head_dim)).transpose([0, 2, 1, 3])
        return self.out_proj(out.reshape([0, 0, out.shape[2] * out.shape[3]]))


class Resampler(nn.Layer):
    """256 learned queries cross-attend to the patch features -> a fixed-length image summary.

    Queries carry the 16x16 2-D sin-cos table; keys carry the same table resized to the patch
    grid; values carry no position.
    """

    def __init__(self, cfg: VisualConfig):
        super().__init__()
        dim, grid_q = cfg.output_dim, int(math.isqrt(cfg.n_queries))
        self.grid = cfg.grid
        self.pos_embed = self.create_parameter(
            [cfg.n_queries, dim],
            default_initializer=nn.initializer.Assign(sincos_2d_table(dim, grid_q)))
        # Qwen-VL keeps the table fixed; it is a parameter only so checkpoints carry it.
        self.pos_embed.stop_gradient = True
        self.query = self.create_parameter(
            [cfg.n_queries, dim], default_initializer=nn.initializer.TruncatedNormal(std=0.02))
        self.kv_proj = nn.Linear(cfg.width, dim, bias_attr=False) if cfg.width != dim else None
        self.attn = ResamplerAttention(dim, cfg.num_resampler_heads)
        self.ln_q = nn.LayerNorm(dim, epsilon=LN_EPS)
        self.ln_kv = nn.LayerNorm(dim, epsilon=LN_EPS)
        self._init_local_attention(cfg.resampler_init_scale)

    def _init_local_attention(self, scale: float) -> None:
        """Start each query attending to the patches at its own grid position (scale > 0).

        Why: with Xavier-random Q/K projections (Qwen-VL's init, made for a pretrained ViT) a model
        trained from scratch starts with near-uniform attention, so all 256 outputs of an image are
        the same global average (measured on the tiny model after 5 training minutes: token-to-token
        spread 0.03 against 0.99 between images) and the decoder never sees *where* anything is.
        Here the Q and K blocks start as `scale` x a permutation that gives every head matching
        sin/cos pairs of both axes, and ln_q starts at zero, so a score starts as
        scale^2 * pos(query) . (pos(key) + content): local in 2-D. Only the initial values change:
        names and shapes stay Qwen-VL's, and loaded checkpoints overwrite all of it — which is why a
        lazily built model (nothing allocated yet, weights to come from a checkpoint) skips it.
        """
        if scale <= 0 or not self.attn.in_proj_weight._is_initialized():
            return
        dim, heads = self.query.shape[1], self.attn.heads
        quarter = dim // 4  # the table is [sin_h | cos_h | sin_w | cos_w], `quarter` frequencies each
        if dim % 4 or quarter % heads:
            raise UserError(f"model config: resampler_init_scale needs visual.output_dim ({dim}) divisible "
                            f"by 4 x resampler_heads ({heads}) so every head gets sin/cos pairs of both axes")
        order = [block * quarter + f for h in range(heads)
                 for block in range(4) for f in range(h, quarter, heads)]
        perm = np.zeros((dim, dim), dtype=np.float32)
        perm[order, np.arange(dim)] = scale  # column j (head j // head_dim) reads table dim order[j]
        weight = self.attn.in_proj_weight.astype("float32").numpy()  # float32 whatever the model dtype
        weight[:, :dim] = perm
        weight[:, dim:2 * dim] = perm
        self.attn.in_proj_weight.set_value(paddle.to_tensor(weight).astype(self.attn.in_proj_weight.dtype))
        self.ln_q.weight.set_value(paddle.zeros([dim], dtype=self.ln_q.weight.dtype))

    def forward(self, x):  # [N, L, width] -> [N, n_queries, dim]
        key_pos = resize_pos_embed(self.pos_embed, self.grid)
        if self.kv_proj is not None:
            x = self.kv_proj(x)
        x = self.ln_kv(x)
        q = (self.ln_q(self.query) + self.pos_embed).unsqueeze(0).expand([x.shape[0], -1, -1])
        return self.attn(q, x + key_pos, x)


class VisionTower(nn.Layer):
    """`model.visual`: images [N, 3, S, S] -> features [N, n_queries, hidden]."""

    def __init__(self, cfg: VisualConfig):
        super().__init__()
        self.config = cfg
        self.vit = VisionTransformer(cfg)
        self.attn_pool = Resampler(cfg)
        self.ln_post = nn.LayerNorm(cfg.output_dim, epsilon=LN_EPS)
        self.proj = self.create_parameter(
            [cfg.output_dim, cfg.output_dim],
            default_initializer=nn.initializer.Normal(std=cfg.output_dim ** -0.5))

    def forward(self, images):
        x = self.vit(images.astype(self.proj.dtype))
        x = self.ln_post(self.attn_pool(x))
        return paddle.matmul(x, self.proj)
