"""LoRA adapters through `paddlenlp.peft`, saved in PaddleNLP's own (safetensors) layout.

A LoRA directory holds `lora_config.json`, `peft_model.safetensors` and
`peft_model.safetensors.index.json` — exactly what `paddlenlp.peft.LoRAModel.from_pretrained`
reads, so adapters trained here load in PaddleNLP and vice versa. PaddleNLP's default
`save_pretrained` writes a pickle (`lora_model_state.pdparams`); we write safetensors instead
because unpickling can run code. A pickle adapter still loads with `allow_pickle=True`.

paddlenlp is imported lazily: only LoRA runs and merges pay for its import time.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write
from ..runtime import UserError, quiet_environment

CONFIG_NAME = "lora_config.json"
WEIGHTS_NAME = "peft_model.safetensors"
INDEX_NAME = "peft_model.safetensors.index.json"
PICKLE_NAME = "lora_model_state.pdparams"


def _quiet_peft():
    quiet_environment()
    from paddlenlp.peft import LoRAConfig, LoRAModel
    from paddlenlp.utils.log import logger

    logger.set_level("WARNING")  # its INFO lines would drown our progress output
    return LoRAConfig, LoRAModel


def _prepare_base(model):
    # LoRAModel reads model.config.tensor_parallel_degree; our config is a plain dataclass.
    for key, value in (("tensor_parallel_degree", 1), ("tensor_parallel_rank", 0)):
        if not hasattr(model.config, key):
            setattr(model.config, key, value)
    return model


def make_lora_config(targets: list[str], r: int, alpha: float, dropout: float, merge: bool = False,
                     dtype: str = "float32"):
    """PaddleNLP's LoRAConfig; `dtype` is the adapters' (PaddleNLP creates them in it)."""
    LoRAConfig, _ = _quiet_peft()
    return LoRAConfig(target_modules=list(targets), r=int(r), lora_alpha=alpha,
                      lora_dropout=float(dropout), merge_weights=merge,
                      tensor_parallel_degree=1, dtype=dtype)


def matching_linears(model, targets: list[str]) -> list:
    """[(name, Linear)] that PaddleNLP's LoRAModel adapts: sublayers whose full name fully matches a
    target regex. A target matching no sublayer at all is a UserError (a typo adapts nothing)."""
    import re

    import paddle

    named = list(model.named_sublayers())
    for pattern in targets:
        if not any(re.fullmatch(pattern, name) for name, _ in named):
            raise UserError(f"lora_target_modules pattern {pattern!r} matches no layer "
                            f"(full regex match on names like {named[-1][0]!r})")
    linear = paddle.nn.Linear
    return [(name, layer) for name, layer in named
            if isinstance(layer, linear) and any(re.fullmatch(p, name) for p in targets)]


def apply_lora(model, targets: list[str], r: int, alpha: float, dropout: float, dtype: str = "float32"):
    """Wrap `model` in a LoRAModel: adapters (in `dtype`, the model's: PaddleNLP's bfloat16 LoRA
    recipe) on every Linear whose name fully matches a target regex, everything else frozen. The
    base model stays reachable as `.model`."""
    _, LoRAModel = _quiet_peft()
    matching_linears(model, targets)
    wrapped = LoRAModel(_prepare_base(model), make_lora_config(targets, r, alpha, dropout, dtype=dtype))
    if not any(not p.stop_gradient for p in wrapped.parameters()):
        raise UserError("LoRA left no parameter to train")
    return wrapped


def lora_state(wrapped) -> dict:
    """The adapter tensors under PaddleNLP's keys (names relative to the base model)."""
    return dict(wrapped.get_trainable_state_dict())


def save_lora(wrapped, directory: Path) -> None:
    """Write the adapters + `lora_config.json` (PaddleNLP layout, safetensors)."""
    from ..model.weights_io import save_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = lora_state(wrapped)
    save_safetensors(state, directory / WEIGHTS_NAME)
    total = sum(int(t.numel()) * t.element_size() for t in state.values())
    with atomic_write(directory / INDEX_NAME) as handle:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": {key: WEIGHTS_NAME for key in sorted(state)}}, handle, indent=2)
    config = wrapped.lora_config.to_dict()
    config["dtype"] = str(config.get("dtype") or "float32")
    with atomic_write(directory / CONFIG_NAME) as handle:
        json.dump(config, handle, indent=2, default=str)


def read_lora_dir(directory: Path, allow_pickle: bool = False) -> tuple[dict, dict]:
    """(lora_config dict, {key: tensor}) of a saved adapter directory, safetensors or pickle."""
    from ..model.weights_io import load_model_state, load_safetensors

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise UserError(f"{directory}: not a LoRA directory (no {CONFIG_NAME})")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{directory / CONFIG_NAME}: invalid JSON ({err})") from None
    if (directory / WEIGHTS_NAME).is_file():
        return config, load_safetensors(directory / WEIGHTS_NAME)
    if (directory / PICKLE_NAME).is_file():
        return config, load_model_state(directory / PICKLE_NAME, allow_pickle=allow_pickle)
    raise UserError(f"{directory}: no adapter weights ({WEIGHTS_NAME} or, with --allow_pickle, "
                    f"{PICKLE_NAME})")


def load_lora_weights(wrapped, directory: Path, allow_pickle: bool = False) -> None:
    """Set a wrapped model's adapters from a saved directory (resume), checking every key."""
    _, state = read_lora_dir(directory, allow_pickle)
    _assign(wrapped, state, directory)


def _assign(wrapped, state: dict, source) -> None:
    from ..model.weights_io import assign_state

    assign_state(lora_state(wrapped), state, str(source), hint="different LoRA targets or rank?")


def merge_lora(model, directory: Path, allow_pickle: bool = False) -> tuple[dict, int]:
    """Merge a saved adapter into `model` (in place) and return the plain state dict, with no
    `lora` keys left: W' = W + A·B·scaling for every adapted Linear, PaddleNLP's LoRALinear formula
    with its `scaling` (alpha/r, or rslora's / pissa's), computed in float32 and stored in W's dtype
    (so a bfloat16 base merges on a CPU, which has no bfloat16 matmul; for a float32 base the result
    is bit for bit PaddleNLP's own merge). Returns (state dict, number of adapted layers)."""
    import paddle

    config_dict, state = read_lora_dir(directory, allow_pickle)
    LoRAConfig, LoRAModel = _quiet_peft()
    from paddlenlp.peft.lora.lora_layers import LoRALinear

    known = set(LoRAConfig.__dataclass_fields__)
    lora_config = LoRAConfig(**{k: v for k, v in config_dict.items() if k in known and k != "dtype"})
    lora_config.merge_weights = False  # merged below, in float32
    lora_config.tensor_parallel_degree = 1
    lora_config.lora_dropout = 0.0
    lora_config.dtype = "float32"  # the adapters are read into float32 (exact from bfloat16/float16)
    try:
        wrapped = LoRAModel(_prepare_base(model), lora_config)
    except Exception as err:  # a target regex that finds layers of a different shape, etc.
        raise UserError(f"{directory}: adapter does not fit this model ({err})") from None
    _assign(wrapped, state, directory)
    adapted = [layer for layer in wrapped.model.sublayers() if hasattr(layer, "lora_A")]
    with paddle.no_grad():
        for layer in adapted:
            if type(layer) is not LoRALinear:
                raise UserError(f"{directory}: {type(layer).__name__} adapters cannot be merged here "
                                "(plain LoRALinear only)")
            delta = layer.lora_A @ layer.lora_B * layer.scaling
            layer.weight.set_value((layer.weight.astype("float32") + delta).astype(layer.weight.dtype))
    merged = {key: tensor for key, tensor in wrapped.model.state_dict().items() if "lora" not in key}
    return merged, len(adapted)
