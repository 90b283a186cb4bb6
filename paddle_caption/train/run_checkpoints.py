"""Training checkpoints: what trained, the optimiser state and the loop position, written atomically.

A checkpoint directory holds only what trained — `local_params.safetensors` (the trainable
parameters under their structured names, e.g. `transformer.llm.h.16.attn.c_attn.weight`) or `lora/`
(PaddleNLP's adapter layout) — plus `optimizer.safetensors`, `trainer_state.json` (the loop
position), `model_config.json`, `prompt.json` and `train_config.json`. It is written to a temp
directory and renamed, so a killed run leaves either a complete checkpoint or none. Rank 0 writes
it; under optimizer-state sharding every rank first writes its own share of the optimizer state
into the temp directory (`optimizer.rank{r}-of-{n}.safetensors` instead of `optimizer.safetensors`).

The optimiser state goes through Paddle's public `state_dict()` / `set_state_dict()`. Paddle keys it
by parameter *object* names (`linear_15.w_0_moment1_0`), which depend on how many layers a process
built before; on disk the keys are structured names (`<parameter>::<accumulator>`), so a resumed or
merged run finds its moments whatever it built first.

bfloat16/float16 runs (mixed_precision.py) also keep a float32 master copy of every trainable
parameter (`<parameter>::master_weights`). Paddle names a master copy `<object>_fp32_master_<k>` and
its moments after it (`linear_15.w_0_fp32_master_0_moment1_0`); on disk they are stored under the
parameter like a float32 run's (`<parameter>::moment1_0`), and on resume each master copy is made as
Paddle makes it (a float32 cast of the parameter, on its device) holding the saved values, under the
name its moments are then looked up by. The float16 loss scaler's state is `scaler.json`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..files import write_json
from ..runtime import UserError

CHECKPOINT_PREFIX = "checkpoint-"
FINAL_DIR = "final"
LOCAL_PARAMS = "local_params.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
SCALER_STATE = "scaler.json"  # float16 runs: the GradScaler's state (PaddleNLP: scaler.pdparams)
OBJECTIVE_STATE = "objective_state.json"  # the training objective's state, when it has one (objectives.py)
MASTER_WEIGHTS = "master_weights"  # Paddle's sub-dict of float32 copies (multi_precision)
_SEPARATOR = "::"
_MASTER_PREFIX = re.compile(r"^fp32_master_\d+_")  # a master copy's accumulators: <object>_fp32_master_0_moment1_0


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete numbered checkpoints, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint (numbered or final) with the most steps, or None."""
    candidates = list_checkpoints(output_dir)
    final = Path(output_dir) / FINAL_DIR
    if (final / STATE_FILE).is_file():
        candidates.append(final)
    if not candidates:
        return None
    return max(candidates, key=lambda p: read_state(p)["step"])


def read_state(checkpoint: Path) -> dict:
    try:
        return json.loads((Path(checkpoint) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{checkpoint / STATE_FILE}: unreadable trainer state ({err})") from None


def read_objective_state(checkpoint: Path) -> dict:
    """The objective's saved state ({} when the checkpoint has none: the objective keeps none)."""
    path = Path(checkpoint) / OBJECTIVE_STATE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable objective state ({err})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: the objective state must be a JSON object")
    return state


# ---- optimiser state under structured names ------------------------------------------------------
def optimizer_state(optimizer, named_params: list[tuple[str, object]]) -> dict:
    """The optimiser's state ({structured name::accumulator: tensor}) from its public state_dict."""
    by_object = _longest_first({param.name: name for name, param in named_params})
    out = {}
    for key, value in optimizer.state_dict().items():
        if key == MASTER_WEIGHTS:
            for object_name, tensor in value.items():
                out[f"{by_object[object_name]}{_SEPARATOR}{MASTER_WEIGHTS}"] = tensor
            continue
        if not hasattr(value, "shape"):
            raise UserError(f"optimizer state entry {key!r} is not a tensor; the trainer sets the "
                            "learning rate itself and keeps no scheduler in the optimizer")
        object_name = next((o for o in by_object if key.startswith(o + "_")), None)
        if object_name is None:
            raise UserError(f"optimizer state entry {key!r} belongs to no trainable parameter")
        accumulator = _MASTER_PREFIX.sub("", key[len(object_name) + 1:])
        out[f"{by_object[object_name]}{_SEPARATOR}{accumulator}"] = value
    return out


def set_optimizer_state(optimizer, named_params: list[tuple[str, object]], state: dict, source) -> None:
    """The inverse of `optimizer_state`: translate structured keys back and `set_state_dict`."""
    by_name = dict(named_params)
    entries = []
    for key, value in state.items():
        name, _, accumulator = key.partition(_SEPARATOR)
        if name not in by_name:
            raise UserError(f"{source}: optimizer state for {name!r}, which does not train in this run")
        entries.append((by_name[name], accumulator, value))
    masters = {param.name: _master_copy(param, value) for param, accumulator, value in entries
               if accumulator == MASTER_WEIGHTS}
    translated = {}
    for param, accumulator, value in entries:
        if accumulator != MASTER_WEIGHTS:  # a master copy's moments are named after the copy
            owner = masters[param.name].name if param.name in masters else param.name
            translated[f"{owner}_{accumulator}"] = value
    if masters:
        translated[MASTER_WEIGHTS] = masters
    optimizer.set_state_dict(translated)


def _master_copy(param, value):
    """A float32 master copy of `param` holding `value`, made as Paddle's optimizer makes one
    (`_create_master_weight`: a cast of the parameter, so on its device) and named as the first copy
    Paddle makes of it, which its moments' names then follow."""
    import paddle

    copy = paddle.cast(param, "float32")
    copy.set_value(value)
    copy.name = f"{param.name}_fp32_master_0"
    return copy


# ---- the float16 loss scaler --------------------------------------------------------------------
def scaler_state(scaler) -> dict:
    """The GradScaler's state as JSON (the scale is a float32, exact as a JSON number)."""
    state = dict(scaler.state_dict())
    state["scale"] = [float(x) for x in state["scale"]]
    return state


def set_scaler_state(scaler, data: dict, source) -> None:
    import numpy as np

    try:
        state = {**data, "scale": np.asarray(data["scale"], dtype=np.float32)}
        scaler.load_state_dict(state)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{source}: not a loss-scaler state ({err!r})") from None


def _longest_first(mapping: dict) -> dict:
    # "linear_1.w_0" must not claim "linear_1.w_0x_..." entries: try longer object names first
    return dict(sorted(mapping.items(), key=lambda item: -len(item[0])))


def optimizer_shard_name(rank: int, world: int) -> str:
    """One rank's share of a sharded optimizer state."""
    return f"optimizer.rank{rank}-of-{world}.safetensors"


# ---- writing and reading a checkpoint ------------------------------------------------------------
def temp_dir(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / f".{name}.tmp"


def begin_checkpoint(output_dir: Path, name: str) -> Path:
    """An empty temp directory for checkpoint `name` (files other ranks add go here first)."""
    tmp = temp_dir(output_dir, name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(output_dir: Path, name: str, *, trained: dict | None, lora_model=None,
                    optimizer_tensors: dict | None, files: dict, state: dict, keep: int = 0,
                    begun: bool = False) -> Path:
    """Write checkpoint `name` in `output_dir` atomically (temp dir + rename) and keep only the
    `keep` newest numbered checkpoints (0 keeps all). `trained` is {structured name: tensor}
    (partial/full runs) or None with `lora_model` (LoRA runs); `files` are JSON files to add.
    `begun`: the temp directory was made by `begin_checkpoint` and already holds the optimizer
    state's shards (then `optimizer_tensors` is None)."""
    from ..model.weights_io import save_safetensors

    target = Path(output_dir) / name
    tmp = temp_dir(output_dir, name) if begun else begin_checkpoint(output_dir, name)
    if lora_model is not None:
        from .lora import save_lora

        save_lora(lora_model, tmp / "lora")
    else:
        save_safetensors(trained, tmp / LOCAL_PARAMS)
    if optimizer_tensors is not None:
        save_safetensors(optimizer_tensors, tmp / OPTIMIZER_STATE)
    for file_name, data in files.items():
        write_json(tmp / file_name, data)
    write_json(tmp / STATE_FILE, state)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_trained(checkpoint: Path, named_trainable: list[tuple[str, object]], lora_model=None) -> None:
    """Set the trained parameters (or LoRA adapters) from a checkpoint, every key checked."""
    from ..model.weights_io import assign_state, load_safetensors

    if lora_model is not None:
        from .lora import load_lora_weights

        load_lora_weights(lora_model, checkpoint / "lora")
        return
    assign_state(dict(named_trainable), load_safetensors(checkpoint / LOCAL_PARAMS),
                 str(checkpoint / LOCAL_PARAMS), hint="a checkpoint of another run?")
