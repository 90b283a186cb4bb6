"""The model a run starts from, and which of its parameters train.

A run starts from a pretrained model directory (a real Qwen-VL / Mgen-VL checkpoint) or from an
architecture JSON, randomly initialised from `init_seed`. Merging rebuilds that same start to add
the trained parameters to (`merge.py`), so both go through `initial_model`.
"""
from __future__ import annotations

from pathlib import Path

from ..runtime import UserError
from .config import resolve_path


def initial_model(model_name_or_path: str | None, model_config: str | None, init_seed: int,
                  allow_pickle: bool = False, dtype: str | None = None):
    """(model, model directory or None): the pretrained model (in `dtype`; None: as stored where the
    device computes in it, else float32), or the architecture randomly initialised from
    `init_seed`, built directly in `dtype` (None: float32) and bit for bit the same on every call
    with the same seed and dtype."""
    import paddle

    from ..model.config import MgenVLConfig
    from ..model.mgen_vl import MgenVLForCausalLM

    source = model_name_or_path or model_config
    path = resolve_path(source)
    if path is None or not Path(path).exists():
        raise UserError(f"{source}: no such model directory or model config file")
    if model_name_or_path:
        return MgenVLForCausalLM.from_pretrained(path, allow_pickle=allow_pickle, dtype=dtype), Path(path)
    config = MgenVLConfig.from_pretrained(path)
    paddle.seed(init_seed)
    return MgenVLForCausalLM.from_config(config, dtype=dtype or "float32"), None


def setup_trainable(model, cfg, log=print):
    """Freeze by the config's mode and globs (or wrap in LoRA, adapters in the model's dtype);
    returns the model to train."""
    from .freeze import apply_freezing, apply_lr_scale

    if cfg.finetune_mode == "lora":
        from .lora import apply_lora

        model = apply_lora(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                           dtype=model.dtype)
    elif cfg.finetune_mode == "draft_heads":
        return model  # the base is frozen and the heads attached once the data is read (objectives.py)
    elif cfg.finetune_mode == "full":
        apply_freezing(model, ["*"], cfg.frozen, "full")
    else:
        apply_freezing(model, cfg.trainable, cfg.frozen, "partial")
    if cfg.lr_scale:
        scaled = apply_lr_scale(model, cfg.lr_scale)
        log(f"lr_scale: {len(scaled)} parameter(s) at " + ", ".join(
            f"{f:g}x" for f in sorted(set(scaled.values()))) + " of learning_rate")
    return model
