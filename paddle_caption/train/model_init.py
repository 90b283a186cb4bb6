"""The model a run starts from, and which of its parameters train.

A run starts from a pretrained model directory (a real Qwen-VL / Mgen-VL checkpoint) or from an
architecture JSON, randomly initialised from `init_seed`. Merging rebuilds that same start to add
the trained parameters to (`merge.py`), so both go through `initial_model`.
"""
from __future__ import annotations

from pathlib import Path

from ..files import read_json_object
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


def apply_init_from(model, init_from: str, start: str, allow_pickle: bool = False, log=print) -> None:
    """Load a training checkpoint's trained parameters into `model`, the run's start model (`start`:
    its model_name_or_path or model_config), in place: a full/partial run's `local_params`, or a LoRA
    run's adapters merged in (W + A·B·scaling). The checkpoint must come from a run on the same start
    (its train_config.json says which) and architecture; a draft-heads run is refused (its heads
    belong beside a model, not in it)."""
    from ..model.draft_heads import has_draft_heads
    from .merge import check_same_architecture, read_run_config, replace_local_params, resolve_checkpoint

    ckpt = resolve_checkpoint(Path(init_from))
    run = read_run_config(ckpt)
    theirs = run.get("model_name_or_path") or run.get("model_config")
    if theirs and resolve_path(theirs) != resolve_path(start):
        raise UserError(f"init_from {ckpt}: that run started from {theirs}, this one from {start}; "
                        "init_from needs the same start model")
    if has_draft_heads(ckpt):
        raise UserError(f"init_from {ckpt}: a draft_heads run trains heads beside a model; merge it instead")
    check_same_architecture(model, ckpt)
    if (ckpt / "lora").is_dir() or (ckpt / "lora_config.json").is_file():
        from .lora import merge_lora

        _, count = merge_lora(model, ckpt / "lora" if (ckpt / "lora").is_dir() else ckpt, allow_pickle=allow_pickle)
        what = f"{count} LoRA-adapted layer(s) merged"
    else:
        what = f"{replace_local_params(model, ckpt)} parameter(s) replaced"
    step = read_json_state(ckpt).get("step")
    log(f"init_from {ckpt} (step {step}): {what}")


def read_json_state(ckpt: Path) -> dict:
    from .run_checkpoints import STATE_FILE

    path = ckpt / STATE_FILE
    return read_json_object(path, "file") if path.is_file() else {}


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
