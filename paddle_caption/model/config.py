"""MgenVLConfig: every hyper-parameter of the Qwen-VL / Mgen-VL architecture.

Field names follow PaddleNLP's `QWenConfig` (LLM) and PaddleMIX's `visual` block, so a real
Qwen-VL / Mgen-VL `config.json` loads unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..files import read_json_object, write_json
from ..runtime import UserError
from ..typed_config import from_mapping

CONFIG_NAMES = ("config.json", "model_config.json")  # ours/PaddleNLP's, PaddleMIX's
IGNORE_INDEX = -100  # the label of a position the loss skips (the prompt context, padding)

# Keys that upstream config files carry but that do not change the function computed here
# (runtime switches, provenance, fused-kernel flags). They are accepted and dropped; any other
# unknown key is an error, so a typo never passes silently. `dtype`/`torch_dtype`/`bf16`/... and
# `recompute`/`use_recompute` are runtime settings here: the dtype a model is built and loaded in
# (`from_config`/`from_pretrained(dtype=...)`, TrainConfig.dtype) and activation checkpointing
# (`MgenVLForCausalLM.enable_recompute()`, TrainConfig.recompute), so a checkpoint saved with
# recompute on does not silently turn it on for inference.
IGNORED_UPSTREAM_KEYS = {
    "model_type", "architectures", "auto_map", "transformers_version", "paddlenlp_version",
    "torch_dtype", "dtype", "bf16", "fp16", "fp32", "onnx_safe", "softmax_in_fp32",
    "tokenizer_type", "use_cache", "use_flash_attn", "use_flash_attention", "use_fused_rms_norm",
    "use_fused_rope", "scale_attn_weights", "llm_pretrained_model_name_or_path", "derived",
    "_name_or_path", "pad_token_id", "bos_token_id", "eos_token_id", "recompute",
    "tensor_parallel_degree", "tensor_parallel_rank", "sequence_parallel", "fuse_attention_qkv",
    "fuse_attention_ffn", "use_recompute", "recompute_granularity", "chat_format",
    "max_window_layers", "tensor_parallel_output",
}


@dataclass
class VisualConfig:
    """The vision tower: ViT (patch conv + transformer) followed by the resampler."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096
    n_queries: int = 256
    # PaddleMIX hard-codes output_dim // 128 heads; that is 0 for a model narrower than 128, so
    # the tiny model may set it (None = PaddleMIX's rule).
    resampler_heads: int | None = None
    # > 0: initialise the resampler's Q/K so each query starts attending to its own grid position
    # (see Resampler._init_local_attention); 0 keeps Qwen-VL's random init. Init only.
    resampler_init_scale: float = 0.0
    image_start_id: int | None = None  # informational copy of the top-level id (PaddleMIX keeps it here)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_resampler_heads(self) -> int:
        return self.resampler_heads or max(1, self.output_dim // 128)

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass
class MgenVLConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016  # the SwiGLU width is intermediate_size // 2, as in QWen
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    layer_norm_epsilon: float = 1e-6
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    seq_length: int = 2048
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    visual: VisualConfig = field(default_factory=VisualConfig)
    image_start_id: int = 151857
    image_end_id: int = 151858
    image_pad_id: int = 151859
    # The no-image ablation: image rows are written as zeros instead of visual features. Saved in
    # config.json so a model trained that way is also evaluated that way.
    ablate_images: bool = False

    def __post_init__(self):
        if isinstance(self.visual, dict):
            self.visual = from_mapping(VisualConfig, self.visual, "model config: visual", ignore=IGNORED_UPSTREAM_KEYS)
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise UserError(
                f"model config: kv_channels ({self.kv_channels}) x num_attention_heads "
                f"({self.num_attention_heads}) must equal hidden_size ({self.hidden_size})")
        if self.visual.output_dim != self.hidden_size:
            raise UserError(
                f"model config: visual.output_dim ({self.visual.output_dim}) must equal hidden_size "
                f"({self.hidden_size}): image features are written into the token embeddings")
        if self.visual.output_dim % self.visual.num_resampler_heads:
            raise UserError("model config: visual.output_dim must be divisible by resampler_heads")
        if self.visual.width % self.visual.heads:
            raise UserError("model config: visual.width must be divisible by visual.heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def image_span_length(self) -> int:
        """`<img>` + n_queries pads + `</img>`."""
        return self.visual.n_queries + 2

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config") -> "MgenVLConfig":
        return from_mapping(cls, data, source, ignore=IGNORED_UPSTREAM_KEYS)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MgenVLConfig":
        """Read a config from a JSON file or a model directory (config.json / model_config.json)."""
        path = Path(path)
        if path.is_dir():
            for name in CONFIG_NAMES:
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise UserError(f"{path}: no {' or '.join(CONFIG_NAMES)} in this model directory")
        return cls.from_dict(read_json_object(path, "model config"), f"model config {path}")

    def save_pretrained(self, directory: str | Path) -> Path:
        target = Path(directory) / "config.json"
        write_json(target, self.to_dict())
        return target
