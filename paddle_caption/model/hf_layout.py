"""The public Hugging Face Qwen-VL / Qwen-VL-Chat checkpoint layout, mapped to ours (PaddleMIX's).

Written from upstream's own modeling files: Qwen-VL's `modeling_qwen.py` (`QWenLMHeadModel` holds
`transformer` = `QWenModel` with `wte`, `h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2,
mlp.c_proj}`, `ln_f` and `visual` = `VisionTransformer(**config.visual)`, plus `lm_head`),
Qwen-VL's `visual.py` (`conv1`, `positional_embedding`, `ln_pre`, `transformer.resblocks.N.{ln_1,
attn.in_proj, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `attn_pool` = `Resampler` with `query`,
`pos_embed`, `kv_proj`, `attn` = `torch.nn.MultiheadAttention`, `ln_q`, `ln_kv`, then `ln_post` and
`proj`), and PaddleMIX's `paddlemix/models/qwen_vl/{modeling,visual,qwen_vit}.py` (`visual` = `Vision`
with `vit` = `VisionTransformer`, `attn_pool`, `ln_post`, `proj`; `transformer` = `QWen` whose `llm`
is PaddleNLP's `QWenModel`; `lm_head`) — our names.

| Hugging Face (PyTorch)                                         | ours / PaddleMIX                                          | transpose |
|----------------------------------------------------------------|-----------------------------------------------------------|-----------|
| transformer.wte.weight [V, H]                                  | transformer.llm.wte.weight [V, H]                         | no        |
| transformer.h.{i}.ln_1/ln_2.weight                             | transformer.llm.h.{i}.ln_1/ln_2.weight                    | no        |
| transformer.h.{i}.attn.c_attn.weight [3H, H] / .bias [3H]      | transformer.llm.h.{i}.attn.c_attn.weight [H, 3H] / .bias  | yes / no  |
| transformer.h.{i}.attn.c_proj.weight [H, H]                    | transformer.llm.h.{i}.attn.c_proj.weight                  | yes       |
| transformer.h.{i}.mlp.w1/w2.weight [F, H], c_proj.weight [H, F] | transformer.llm.h.{i}.mlp.w1/w2/c_proj.weight [in, out]  | yes       |
| transformer.ln_f.weight                                        | transformer.llm.ln_f.weight                               | no        |
| lm_head.weight [V, H]                                          | lm_head.weight [H, V]                                     | yes       |
| transformer.visual.conv1.weight [W, 3, p, p]                   | visual.vit.conv1.weight (same [out, in, kh, kw])          | no        |
| transformer.visual.positional_embedding [256, W]               | visual.vit.positional_embedding                           | no        |
| transformer.visual.ln_pre.weight/bias                          | visual.vit.ln_pre.weight/bias                             | no        |
| transformer.visual.transformer.resblocks.{i}.ln_1/ln_2.*       | visual.vit.transformer.resblocks.{i}.ln_1/ln_2.*          | no        |
| ...resblocks.{i}.attn.in_proj.weight [3W, W] (per-head q|k|v)   | ...resblocks.{i}.attn.in_proj.weight [W, 3W]              | yes       |
| ...resblocks.{i}.attn.out_proj.weight, mlp.c_fc/c_proj.weight  | the same names under visual.vit.                          | yes       |
| ...resblocks.{i}.attn.*.bias, mlp.*.bias                        | the same names under visual.vit.                          | no        |
| transformer.visual.attn_pool.query / pos_embed [256, D]        | visual.attn_pool.query / pos_embed                        | no        |
| transformer.visual.attn_pool.kv_proj.weight [D, W]             | visual.attn_pool.kv_proj.weight [W, D]                    | yes       |
| transformer.visual.attn_pool.attn.in_proj_weight [3D, D]       | visual.attn_pool.attn.in_proj_weight [D, 3D] (Q|K|V)      | yes       |
| transformer.visual.attn_pool.attn.in_proj_bias [3D]            | visual.attn_pool.attn.in_proj_bias                        | no        |
| transformer.visual.attn_pool.attn.out_proj.weight / .bias      | visual.attn_pool.attn.out_proj.weight / .bias             | yes / no  |
| transformer.visual.attn_pool.ln_q/ln_kv.*, transformer.visual.ln_post.* | visual.attn_pool.ln_q/ln_kv.*, visual.ln_post.*  | no        |
| transformer.visual.proj [D, D] (used as x @ proj)              | visual.proj (used as x @ proj)                            | no        |

Why the transposes: a PyTorch `nn.Linear(in, out)` stores `weight` as [out, in] and computes
x·weightᵀ; Paddle's `nn.Linear` stores [in, out] and computes x·weight. `torch.nn.MultiheadAttention`
keeps Q|K|V stacked as rows of `in_proj_weight` [3D, D]; ours (PaddleMIX's MultiHeadAttention) as
column blocks of [D, 3D]. `visual.proj` is a raw parameter multiplied as x @ proj on both sides.
Upstream buffers that may appear in a checkpoint (`rotary_emb.inv_freq`, `attn.masked_bias`,
`attn.bias`) are recomputed here and skipped. The HF `config.json` loads as an `MgenVLConfig`
(unknown runtime keys are dropped by name); the image token ids it keeps only as
`visual.image_start_id` (`</img>` and the pad are +1 and +2, as upstream derives them).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..files import atomic_write
from ..runtime import UserError

# (Hugging Face name, our name, transpose); "{i}" is a layer index.
_LLM = "transformer.h.{i}."
_OURS_LLM = "transformer.llm.h.{i}."
_VIT = "transformer.visual.transformer.resblocks.{i}."
_OURS_VIT = "visual.vit.transformer.resblocks.{i}."
TABLE = [
    ("transformer.wte.weight", "transformer.llm.wte.weight", False),
    ("transformer.ln_f.weight", "transformer.llm.ln_f.weight", False),
    ("lm_head.weight", "lm_head.weight", True),
    *[(_LLM + f"{ln}.weight", _OURS_LLM + f"{ln}.weight", False) for ln in ("ln_1", "ln_2")],
    (_LLM + "attn.c_attn.weight", _OURS_LLM + "attn.c_attn.weight", True),
    (_LLM + "attn.c_attn.bias", _OURS_LLM + "attn.c_attn.bias", False),
    (_LLM + "attn.c_proj.weight", _OURS_LLM + "attn.c_proj.weight", True),
    *[(_LLM + f"mlp.{fc}.weight", _OURS_LLM + f"mlp.{fc}.weight", True) for fc in ("w1", "w2", "c_proj")],
    ("transformer.visual.conv1.weight", "visual.vit.conv1.weight", False),
    ("transformer.visual.positional_embedding", "visual.vit.positional_embedding", False),
    *[(f"transformer.visual.ln_pre.{p}", f"visual.vit.ln_pre.{p}", False) for p in ("weight", "bias")],
    *[(_VIT + f"{ln}.{p}", _OURS_VIT + f"{ln}.{p}", False) for ln in ("ln_1", "ln_2") for p in ("weight", "bias")],
    *[(_VIT + f"{fc}.weight", _OURS_VIT + f"{fc}.weight", True)
      for fc in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")],
    *[(_VIT + f"{fc}.bias", _OURS_VIT + f"{fc}.bias", False)
      for fc in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")],
    *[(f"transformer.visual.attn_pool.{p}", f"visual.attn_pool.{p}", False) for p in ("query", "pos_embed")],
    ("transformer.visual.attn_pool.kv_proj.weight", "visual.attn_pool.kv_proj.weight", True),
    ("transformer.visual.attn_pool.attn.in_proj_weight", "visual.attn_pool.attn.in_proj_weight", True),
    ("transformer.visual.attn_pool.attn.in_proj_bias", "visual.attn_pool.attn.in_proj_bias", False),
    ("transformer.visual.attn_pool.attn.out_proj.weight", "visual.attn_pool.attn.out_proj.weight", True),
    ("transformer.visual.attn_pool.attn.out_proj.bias", "visual.attn_pool.attn.out_proj.bias", False),
    *[(f"transformer.visual.attn_pool.{ln}.{p}", f"visual.attn_pool.{ln}.{p}", False)
      for ln in ("ln_q", "ln_kv") for p in ("weight", "bias")],
    *[(f"transformer.visual.ln_post.{p}", f"visual.ln_post.{p}", False) for p in ("weight", "bias")],
    ("transformer.visual.proj", "visual.proj", False),
]
# Buffers upstream versions registered (persistent or not); recomputed here, so skipped.
SKIPPED_HF = re.compile(r"transformer\.rotary_emb\.inv_freq"
                        r"|transformer\.h\.\d+\.attn\.(?:rotary_emb\.inv_freq|masked_bias|bias)")


def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_FORWARD = [(_compile(hf), ours, t) for hf, ours, t in TABLE]
_BACKWARD = [(_compile(ours), hf, t) for hf, ours, t in TABLE]


def _translate(name: str, rules) -> tuple[str, bool] | None:
    for pattern, template, transpose in rules:
        match = pattern.fullmatch(name)
        if match:
            return template.replace("{i}", match.groupdict().get("i") or ""), transpose
    return None


def hf_to_ours(name: str) -> tuple[str, bool] | None:
    """(our name, transpose?) for a Hugging Face Qwen-VL tensor name; None for a skipped buffer;
    UserError for a name the table does not know."""
    if SKIPPED_HF.fullmatch(name):
        return None
    found = _translate(name, _FORWARD)
    if found is None:
        raise UserError(f"unknown Hugging Face Qwen-VL tensor {name!r} (not in the layout table of "
                        "paddle_caption/model/hf_layout.py)")
    return found


def ours_to_hf(name: str) -> tuple[str, bool]:
    found = _translate(name, _BACKWARD)
    if found is None:
        raise UserError(f"parameter {name!r} has no Hugging Face Qwen-VL name")
    return found


def is_hf_name(name: str) -> bool:
    return name.startswith(("transformer.h.", "transformer.visual.", "transformer.wte.", "transformer.ln_f."))


def config_from_hf(data: dict, source: str = "config"):
    """An MgenVLConfig from a Hugging Face Qwen-VL (or PaddleMIX) config dict: the top-level image
    ids, when absent, derive from visual.image_start_id as upstream does."""
    from .config import MgenVLConfig

    data = dict(data)
    start = (data.get("visual") or {}).get("image_start_id")
    if start is not None and "image_start_id" not in data:
        data.update(image_start_id=start, image_end_id=start + 1, image_pad_id=start + 2)
    return MgenVLConfig.from_dict(data, source)


def hf_config(config, dtype: str) -> dict:
    """The Hugging Face `config.json` for `config` (the fields Qwen-VL's configuration_qwen reads)."""
    ours = config.to_dict()
    visual = {k: ours["visual"][k] for k in ("image_size", "patch_size", "width", "layers", "heads",
                                             "mlp_ratio", "output_dim")}
    visual["image_start_id"] = config.image_start_id
    if config.visual.n_queries != 256:  # upstream's VisionTransformer default
        visual["n_queries"] = config.visual.n_queries
    if config.visual.resampler_heads not in (None, config.visual.output_dim // 128):
        raise UserError("a model with visual.resampler_heads set has no Hugging Face Qwen-VL equivalent "
                        "(upstream always uses output_dim // 128 resampler heads)")
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
            "intermediate_size", "rotary_pct", "rotary_emb_base", "layer_norm_epsilon", "emb_dropout_prob",
            "attn_dropout_prob", "initializer_range", "max_position_embeddings", "seq_length",
            "use_dynamic_ntk", "use_logn_attn", "no_bias", "tie_word_embeddings")
    out = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
           "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
           **{k: ours[k] for k in keep}, "visual": visual, "torch_dtype": dtype,
           "bf16": dtype == "bfloat16", "fp16": dtype == "float16", "fp32": dtype == "float32",
           "scale_attn_weights": True, "use_cache": True, "use_flash_attn": False, "onnx_safe": None,
           "tokenizer_type": "QWenTokenizer", "transformers_version": "4.31.0"}
    return out


def save_hf_layout(model, directory, max_shard_bytes: int = 2 << 30) -> list[Path]:
    """Write `model` as a Hugging Face Qwen-VL directory (torch names and orientations, safetensors
    shards, HF config.json, qwen.tiktoken): for round trips and tests, the inverse of the converter."""
    from ..tokenizer import QWenVLTokenizer
    from .weights_io import ShardWriter
    from .precision import dtype_name

    directory = Path(directory)
    writer = ShardWriter(directory, max_shard_bytes)
    for name, param in model.state_dict().items():
        hf_name, transpose = ours_to_hf(name)
        writer.add(hf_name, param.detach().t().contiguous() if transpose else param)
    paths = writer.close()
    tokenizer = QWenVLTokenizer.for_model(model.config)
    files = {"config.json": json.dumps(hf_config(model.config, dtype_name(model.dtype)), indent=2),
             "tokenizer_config.json": json.dumps({"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                                                  "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer",
                                                                                 None]}}, indent=2)}
    for name, text in files.items():
        with atomic_write(directory / name) as handle:
            handle.write(text + "\n")
    with atomic_write(directory / "qwen.tiktoken", "wb") as handle:
        handle.write(tokenizer.vocab_file.read_bytes())
    return paths
