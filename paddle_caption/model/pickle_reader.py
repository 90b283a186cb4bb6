"""Checkpoint pickles read as arrays only, without torch and without running pickle code.

Unpickling runs whatever callables a file names, so an arbitrary pickle can run arbitrary code. The
checkpoints the kit converts name only a handful of callables, all of which rebuild arrays; the
unpicklers here admit exactly those (`find_class`) and refuse anything else by its name, before it
is called. llama.cpp's converter reads PyTorch checkpoints the same way.

- **PyTorch zip checkpoints** (`torch.save` since 1.6; Hugging Face's `pytorch_model-0000i-of-0000n.bin`):
  a zip holding `<root>/data.pkl` (the pickle) and one member `<root>/data/<key>` per storage. The
  pickle names storages through `persistent_load(("storage", <Kind>Storage, key, location, numel))`
  and tensors through `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`. Here a
  storage becomes a read-only numpy view of its zip member, memory-mapped (torch stores members
  uncompressed), and a tensor is an `as_strided` view of it: a 15 GB shard costs one tensor's
  memory at a time once each tensor is copied out (`iter_torch_zip`). bfloat16 storages are numpy
  uint16 (the kit's convention for bfloat16 bits: see safetensors_io.py).
- **Paddle pickles** (`paddle.save`: PaddleMIX's `model_state.pdparams`): a dict of numpy arrays,
  rebuilt by `numpy.core.multiarray._reconstruct`, `numpy.ndarray` and `numpy.dtype`; Paddle's
  `StructuredToParameterName@@` table is plain strings.

A file that needs any other callable is refused (`UnsafePickleError`, naming it); with
`allow_pickle` the caller may still read it with the full unpickler, for files the user vets.
"""
from __future__ import annotations

import collections
import mmap
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime import UserError


class UnsafePickleError(UserError):
    """A pickle names a callable outside the allow-list."""


# torch storage kind -> (dtype name, numpy storage dtype); numpy has no bfloat16: its bits as uint16
TORCH_STORAGES = {
    "FloatStorage": ("float32", np.float32), "HalfStorage": ("float16", np.float16),
    "BFloat16Storage": ("bfloat16", np.uint16), "DoubleStorage": ("float64", np.float64),
    "LongStorage": ("int64", np.int64), "IntStorage": ("int32", np.int32), "ShortStorage": ("int16", np.int16),
    "CharStorage": ("int8", np.int8), "ByteStorage": ("uint8", np.uint8), "BoolStorage": ("bool", np.bool_),
}
# torch.<dtype> objects in a tensor's metadata or an UntypedStorage's pid (newer torch)
TORCH_DTYPES = {"float32": "FloatStorage", "float": "FloatStorage", "float16": "HalfStorage", "half": "HalfStorage",
                "bfloat16": "BFloat16Storage", "float64": "DoubleStorage", "double": "DoubleStorage",
                "int64": "LongStorage", "long": "LongStorage", "int32": "IntStorage", "int": "IntStorage",
                "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}


@dataclass(frozen=True)
class StorageKind:
    name: str  # e.g. "BFloat16Storage"

    @property
    def dtype(self) -> str:
        return TORCH_STORAGES[self.name][0]

    @property
    def numpy_dtype(self):
        return TORCH_STORAGES[self.name][1]


@dataclass
class TorchTensor:
    """A tensor of a PyTorch checkpoint: a strided view of its storage, copied out by `numpy()`."""

    storage: np.ndarray  # the whole storage (1-D, its own dtype)
    dtype: str
    offset: int
    shape: tuple
    stride: tuple

    def numpy(self) -> np.ndarray:
        item = self.storage.itemsize
        if not self.shape:
            return np.array(self.storage[self.offset])
        view = np.lib.stride_tricks.as_strided(self.storage[self.offset:], shape=self.shape,
                                               strides=tuple(s * item for s in self.stride), writeable=False)
        return np.array(view, order="C")  # a copy: the storage is a view of a map that closes


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])."""
    array, kind = storage
    return TorchTensor(array, kind.dtype, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_ignored):
    """torch._utils._rebuild_parameter(data, requires_grad, hooks): the tensor itself."""
    return data


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, handle, load_storage):
        super().__init__(handle)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in TORCH_STORAGES:
            return StorageKind(name)
        if module == "torch" and name in TORCH_DTYPES:  # a dtype object (UntypedStorage pids)
            return StorageKind(TORCH_DTYPES[name])
        raise UnsafePickleError(f"refusing to unpickle {module}.{name}: only tensors, storages and dicts "
                                "are read from a PyTorch checkpoint")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], StorageKind)):
            raise UnsafePickleError(f"refusing a persistent id {str(pid)[:80]}: not a tensor storage")
        kind, key = pid[1], str(pid[2])
        return self._load_storage(key, kind), kind


def _member_view(archive: zipfile.ZipFile, buffer, info: zipfile.ZipInfo, dtype) -> np.ndarray:
    """An uncompressed member as a read-only array over the memory-mapped file (a compressed one
    is read into memory)."""
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(archive.read(info), dtype=dtype)
    header = buffer[info.header_offset:info.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    count = info.file_size // np.dtype(dtype).itemsize
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=start)


def is_torch_zip(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist())


def iter_torch_zip(path: str | Path):
    """(name, dtype name, numpy array) for every tensor of a PyTorch zip checkpoint's state dict,
    without torch and without running pickle code. Arrays are copies (contiguous)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a PyTorch zip checkpoint (a legacy pre-1.6 torch.save file? "
                        "re-save it with a current torch)")
    with open(path, "rb") as raw, zipfile.ZipFile(raw) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise UserError(f"{path}: expected one data.pkl in the zip, found {len(pickles)}")
        root = pickles[0][:-len("data.pkl")]
        byteorder = root + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() not in (b"little",):
            raise UserError(f"{path}: big-endian checkpoint: not supported")
        buffer = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            storages = {}

            def load_storage(key: str, kind: StorageKind):
                if key not in storages:
                    member = f"{root}data/{key}"
                    try:
                        info = archive.getinfo(member)
                    except KeyError:
                        raise UserError(f"{path}: storage {key} missing from the zip") from None
                    storages[key] = _member_view(archive, buffer, info, kind.numpy_dtype)
                return storages[key]

            with archive.open(pickles[0]) as handle:
                state = _TorchUnpickler(handle, load_storage).load()
            if not isinstance(state, dict):
                raise UserError(f"{path}: the pickle holds a {type(state).__name__}, not a state dict")
            for name, tensor in state.items():
                if not isinstance(tensor, TorchTensor):
                    raise UserError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
                yield str(name), tensor.dtype, tensor.numpy()
            del storages, state
        finally:
            try:
                buffer.close()
            except BufferError:  # a caller still holds a view: the map closes when it is dropped
                pass


# ------------------------------------------------------------------------------- Paddle pickles
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise UnsafePickleError(f"refusing to unpickle {module}.{name}: only numpy arrays and dicts are "
                                "read from a Paddle checkpoint without --allow_pickle")


def load_array_pickle(path: str | Path) -> dict:
    """A `paddle.save` state dict ({name: numpy array}) read with the array-only unpickler. Paddle's
    `StructuredToParameterName@@` table is dropped (the structured names are the keys)."""
    path = Path(path)
    with open(path, "rb") as handle:
        state = _ArrayUnpickler(handle).load()
    if not isinstance(state, dict):
        raise UserError(f"{path}: the pickle holds a {type(state).__name__}, not a state dict")
    state.pop("StructuredToParameterName@@", None)
    bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise UserError(f"{path}: entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not an array")
    return state
