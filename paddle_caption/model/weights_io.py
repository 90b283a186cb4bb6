"""Weights on disk: safetensors by default (sharded with an index for large models).

Model weights move one shard and one tensor at a time: `load_into_model` reads every shard's
header first (so a checkpoint of another architecture is refused before any data is read), then
reads each tensor straight into the memory the model keeps (`safetensors_io.py`), casting only if
the checkpoint's dtype differs from the model's; `ShardWriter` writes a shard as soon as it is
full. A lazily built model (`MgenVLForCausalLM.from_config(lazy=True)`) loaded this way peaks near
its own size in host memory (bench/load_checkpoint.py), never near model + checkpoint.

PaddleMIX's pickle checkpoints (`model_state.pdparams`, optionally sharded) load only when the
caller passes `allow_pickle=True`, because unpickling can run arbitrary code; each pickle shard is
unpickled whole (that is the format), assigned, and freed before the next.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from ..files import atomic_write
from ..runtime import UserError
from .safetensors_io import SafetensorsReader, read_header, write_safetensors

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "model_state.pdparams"
PICKLE_INDEX = "model_state.pdparams.index.json"
TORCH_SINGLE = "pytorch_model.bin"  # Hugging Face's PyTorch checkpoints (what Qwen-VL-Chat ships)
TORCH_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".pdparams", ".pdopt", ".pkl", ".pickle", ".bin", ".pt", ".pth")
DEFAULT_SHARD_BYTES = 2 << 30
METADATA = {"format": "np"}  # the tag PaddleNLP writes and reads


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Atomic safetensors write of {name: paddle.Tensor}, in sorted name order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, sorted(tensors.items()), {**METADATA, **(metadata or {})})


def load_safetensors(path: Path) -> dict:
    from safetensors.paddle import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # corrupt header, truncated file
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


class ShardWriter:
    """Write a model directory's weights shard by shard: `add(name, tensor)` in order, then `close()`.

    A shard is written as soon as the next tensor would overflow `max_shard_bytes`, so at most one
    shard's tensors are referenced here at a time (and none copied). One shard is saved as
    `model.safetensors`; several as `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json` (the names PaddleNLP and Hugging Face use).
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        for stale in list(self.directory.glob("model*.safetensors")) + [self.directory / SAFE_INDEX]:
            if stale.exists():
                stale.unlink()
        self._pending, self._pending_bytes = [], 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        nbytes = int(tensor.numel()) * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending.append((name, tensor))
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._written) + 1:05d}.safetensors.tmp"
        self.total_bytes += write_safetensors(path, self._pending, METADATA)
        self._written.append((path, [name for name, _ in self._pending]))
        self._pending, self._pending_bytes = [], 0

    def close(self) -> list[Path]:
        if self._pending or not self._written:
            self._flush()
        if len(self._written) == 1:
            final = self.directory / SAFE_SINGLE
            os.replace(self._written[0][0], final)
            return [final]
        paths, weight_map = [], {}
        for i, (tmp, names) in enumerate(self._written, 1):
            final = self.directory / f"model-{i:05d}-of-{len(self._written):05d}.safetensors"
            os.replace(tmp, final)
            paths.append(final)
            weight_map.update({name: final.name for name in names})
        with atomic_write(self.directory / SAFE_INDEX) as handle:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, handle, indent=2)
        return paths


def save_model_state(state: dict, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     dtype: str | None = None) -> list[Path]:
    """Write {name: tensor} (names sorted) as one safetensors file or shards + index, in each
    tensor's own dtype, or with every floating tensor cast to `dtype` one at a time (a cast is a
    storage conversion: it needs no arithmetic kernel, so bfloat16 works on a CPU too)."""
    from .precision import dtype_name

    target = dtype_name(dtype) if dtype else None
    writer = ShardWriter(directory, max_shard_bytes)
    for key in sorted(state):
        tensor = state[key]
        if target and tensor.is_floating_point() and str(tensor.dtype).replace("paddle.", "") != target:
            tensor = tensor.astype(target)
        writer.add(key, tensor)
    return writer.close()


def weight_files(path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a model directory (or a single weights file), shards in order."""
    path = Path(path)
    if path.is_file():
        _check_format(path, allow_pickle)
        return [path]
    if not path.is_dir():
        raise UserError(f"{path}: model path does not exist")
    if (path / SAFE_INDEX).is_file():
        return _index_files(path / SAFE_INDEX)
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE]
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:  # e.g. a bare `weights.safetensors` export
        return singles
    for index, single in ((PICKLE_INDEX, PICKLE_SINGLE), (TORCH_INDEX, TORCH_SINGLE)):
        pickles = (_index_files(path / index) if (path / index).is_file()
                   else [path / single] if (path / single).is_file() else [])
        if pickles:
            _check_format(pickles[0], allow_pickle)
            return pickles
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise UserError(f"{path}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {PICKLE_SINGLE}, "
                    f"{TORCH_SINGLE} or their .index.json); the directory holds: {found}")


def _index_files(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{index_path}: not a valid weight index ({err})") from None
    files = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise UserError(f"{index_path}: lists shard {file.name}, which is missing")
    return files


def _check_format(path: Path, allow_pickle: bool) -> None:
    """Safetensors, Paddle pickles (.pdparams/.pdopt) and PyTorch zip checkpoints (.bin/.pt/.pth)
    are read; the pickles through `pickle_reader`'s array-only unpicklers, so no flag is needed."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors" or suffix in (".pdparams", ".pdopt", ".bin", ".pt", ".pth"):
        return
    if suffix in PICKLE_SUFFIXES:
        raise UserError(f"{path}: unsupported pickle format {suffix!r} (Paddle .pdparams or PyTorch .bin)")
    raise UserError(f"{path}: unknown checkpoint format {suffix!r} (expected .safetensors)")


def load_file_state(path: Path, allow_pickle: bool = False) -> dict:
    """One weights file -> {name: paddle tensor}. Pickles are read as arrays only
    (`pickle_reader`): a file that names any other callable is refused by name, unless
    `allow_pickle` (--allow_pickle: for a Paddle pickle the user vets) lets Paddle's own unpickler
    read it. A PyTorch file has no such fallback: reading more than tensors would need torch."""
    path = Path(path)
    _check_format(path, allow_pickle)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path)
    import paddle

    from .pickle_reader import UnsafePickleError, iter_torch_zip, load_array_pickle

    if suffix in (".bin", ".pt", ".pth"):
        # numpy holds bfloat16 as uint16, which paddle.to_tensor reads back as bfloat16
        return {name: paddle.to_tensor(array) for name, _, array in iter_torch_zip(path)}
    try:
        return {name: paddle.to_tensor(array) for name, array in load_array_pickle(path).items()}
    except UnsafePickleError as err:
        if not allow_pickle:
            raise UserError(f"{err}; pass --allow_pickle (allow_pickle=True) to read it with Paddle's "
                            "unpickler, only if you trust the file") from None
    return paddle.load(str(path))


def load_model_state(path, allow_pickle: bool = False) -> dict:
    """Load a model directory's weights (or a single weights file) into one {name: tensor} dict.
    For small states (adapters, tests); models load shard by shard with `load_into_model`."""
    state = {}
    for file in weight_files(path, allow_pickle):
        state.update(load_file_state(file, allow_pickle))
    return state


def checkpoint_dtype(path, allow_pickle: bool = False) -> str:
    """The floating dtype holding most of a checkpoint's bytes, from the safetensors headers alone
    ("float32" for pickles, which cannot be inspected without unpickling them)."""
    from .precision import DTYPES

    bytes_by_dtype = Counter()
    for file in weight_files(path, allow_pickle):
        if file.suffix.lower() != ".safetensors":
            return "float32"
        for entry in read_header(file)[0].values():
            if entry.dtype in DTYPES:
                bytes_by_dtype[entry.dtype] += entry.nbytes
    return bytes_by_dtype.most_common(1)[0][0] if bytes_by_dtype else "float32"


def assign_parameter(param, value) -> None:
    """Make `param` hold `value` without a copy when dtype and place already match (the model then
    owns the memory the value was read into); otherwise cast/move first. Works on lazily built
    (not yet allocated) parameters."""
    import paddle

    if value.dtype != param.dtype:
        value = value.astype(param.dtype)
    place = paddle.framework._current_expected_place()
    if not value.place._equals(place):
        value = value._copy_to(place, False)
    param.get_tensor()._share_data_with(value.get_tensor())


def load_into_model(model, path, allow_pickle: bool = False) -> int:
    """Fill every parameter of `model` from the checkpoint at `path`, shard by shard, strictly: a
    missing, unexpected or differently shaped key is an error naming it (checked from the headers
    before any data is read, for safetensors). Returns the number of tensors loaded."""
    own = model.state_dict()
    files = weight_files(path, allow_pickle)
    if all(f.suffix.lower() == ".safetensors" for f in files):
        headers = {}
        for file in files:
            headers.update(read_header(file)[0])
        check_state(own, headers, str(path))
        for file in files:
            with SafetensorsReader(file) as reader:
                for entry in sorted(reader.entries.values(), key=lambda e: e.begin):  # sequential reads
                    assign_parameter(own[entry.name], reader.read_tensor(entry.name))
        return len(headers)
    import paddle

    seen = set()
    for file in files:  # pickle shards: only whole-file loads exist; check as they arrive
        state = load_file_state(file, allow_pickle)
        check_state(own, state, str(file), subset=True)
        for key in list(state):
            value = state.pop(key)
            assign_parameter(own[key], value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value))
            seen.add(key)
        del state
    missing = sorted(set(own) - seen)
    if missing:
        raise UserError(f"{path}: missing key {missing[0]!r} ({ARCHITECTURE_HINT})")
    return len(seen)


ARCHITECTURE_HINT = "checkpoint of a different architecture?"


def check_state(expected: dict, given: dict, source: str, *, subset: bool = False,
                hint: str = ARCHITECTURE_HINT) -> None:
    """Refuse `given` tensors (or safetensors header entries) that do not fit `expected`
    ({name: tensor}), naming the first bad key. Every given key must be expected, with the same
    shape; unless `subset` (e.g. one shard of several), every expected key must be given too.
    `hint` says what a mismatch usually means. The one checker of the kit: model loading, merging,
    LoRA adapters and resumed runs all use it."""
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
            raise UserError(f"{source}: key {key!r} has shape {got}, the model expects {want}")


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


__all__ = ["SAFE_SINGLE", "SAFE_INDEX", "PICKLE_SINGLE", "PICKLE_INDEX", "save_safetensors",
           "load_safetensors", "ShardWriter", "save_model_state", "weight_files", "load_file_state",
           "load_model_state", "checkpoint_dtype", "assign_parameter", "load_into_model",
           "check_state", "assign_state"]
