"""Weights on disk: safetensors by default (sharded with an index for large models).

PaddleMIX's pickle checkpoints (`model_state.pdparams`, optionally sharded) load only when the
caller passes `allow_pickle=True`, because unpickling can run arbitrary code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..files import atomic_write
from ..runtime import UserError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "model_state.pdparams"
PICKLE_INDEX = "model_state.pdparams.index.json"


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Atomic safetensors write of {name: paddle.Tensor}; format "np", the tag PaddleNLP writes and reads."""
    from safetensors.paddle import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    contiguous = {k: v.contiguous() if hasattr(v, "contiguous") else v for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata={"format": "np", **(metadata or {})})
    os.replace(tmp, path)


def load_safetensors(path: Path) -> dict:
    from safetensors.paddle import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # corrupt header, truncated file
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


def save_model_state(state: dict, directory: Path, max_shard_bytes: int = 2 << 30) -> list[Path]:
    """Write state as one safetensors file, or shards + `model.safetensors.index.json`."""
    directory = Path(directory)
    shards, current, size = [], {}, 0
    for key in sorted(state):
        nbytes = int(state[key].numel()) * state[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)
    for stale in list(directory.glob("model*.safetensors")) + [directory / SAFE_INDEX]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        save_safetensors(shards[0], directory / SAFE_SINGLE)
        return [directory / SAFE_SINGLE]
    names, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, directory / name)
        names.append(directory / name)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += int(tensor.numel()) * tensor.element_size()
    with atomic_write(directory / SAFE_INDEX) as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
    return names


def load_model_state(path, allow_pickle: bool = False) -> dict:
    """Load a model directory's weights (or a single weights file) into {name: tensor}."""
    path = Path(path)
    if path.is_file():
        return _load_file(path, allow_pickle)
    if not path.is_dir():
        raise UserError(f"{path}: model path does not exist")
    if (path / SAFE_INDEX).is_file():
        return _load_index(path / SAFE_INDEX, allow_pickle)
    if (path / SAFE_SINGLE).is_file():
        return load_safetensors(path / SAFE_SINGLE)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:  # e.g. a bare `weights.safetensors` export
        return load_safetensors(singles[0])
    if (path / PICKLE_INDEX).is_file():
        return _load_index(path / PICKLE_INDEX, allow_pickle)
    if (path / PICKLE_SINGLE).is_file():
        return _load_file(path / PICKLE_SINGLE, allow_pickle)
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise UserError(f"{path}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX} or, with "
                    f"allow_pickle, {PICKLE_SINGLE}); the directory holds: {found}")


def _load_index(index_path: Path, allow_pickle: bool) -> dict:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise UserError(f"{index_path}: not a valid weight index ({err})") from None
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_load_file(index_path.parent / shard, allow_pickle))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise UserError(f"{index_path}: key {missing[0]!r} is listed but not in its shard")
    return state


def _load_file(path: Path, allow_pickle: bool) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path)
    if suffix in (".pdparams", ".pdopt", ".pkl", ".pickle", ".bin", ".pt", ".pth"):
        if not allow_pickle:
            raise UserError(
                f"{path}: refusing to load a pickle checkpoint (unpickling can run arbitrary code); "
                "convert it to safetensors, or pass allow_pickle=True (--allow_pickle) if you trust it")
        if suffix not in (".pdparams", ".pdopt"):
            raise UserError(f"{path}: unsupported pickle format {suffix!r} (only Paddle .pdparams)")
        import paddle

        return paddle.load(str(path))
    raise UserError(f"{path}: unknown checkpoint format {suffix!r} (expected .safetensors)")


ARCHITECTURE_HINT = "checkpoint of a different architecture?"


def check_state(expected: dict, given: dict, source: str, *, subset: bool = False,
                hint: str = ARCHITECTURE_HINT) -> None:
    """Refuse `given` tensors that do not fit `expected` ({name: tensor}), naming the first bad key.

    Every given key must be expected, with the same shape; unless `subset`, every expected key
    must be given too. `hint` says what a mismatch usually means.
    """
    if not subset:
        missing = sorted(set(expected) - set(given))
        if missing:
            raise UserError(f"{source}: missing key {missing[0]!r} ({hint})")
    extra = sorted(set(given) - set(expected))
    if extra:
        raise UserError(f"{source}: unexpected key {extra[0]!r} ({hint})")
    for key in sorted(given):
        want, got = list(expected[key].shape), list(given[key].shape)
        if want != got:
            raise UserError(f"{source}: key {key!r} has shape {got}, expected {want}")


def assign_state(targets: dict, given: dict, source: str, *, subset: bool = False,
                 hint: str = ARCHITECTURE_HINT) -> int:
    """Check `given` against `targets` ({name: parameter}) as `check_state` does, then copy each
    given tensor into its target, cast to the target's dtype. Returns the number assigned."""
    import numpy as np
    import paddle

    check_state(targets, given, source, subset=subset, hint=hint)
    for key, value in given.items():
        target = targets[key]
        if not isinstance(value, paddle.Tensor):
            value = paddle.to_tensor(np.asarray(value))
        target.set_value(value.astype(target.dtype))
    return len(given)
