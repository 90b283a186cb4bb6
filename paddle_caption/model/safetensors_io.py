"""Safetensors files read and written one tensor at a time, with plain file I/O.

Why not the `safetensors` package for model weights: its readers memory-map the file, and every
page a read touches stays in the process's resident set until the file is closed, so reading a
whole shard costs the shard's size in RSS on top of the model it fills; its writers first turn a
whole shard into bytes objects. Here a tensor is read with `readinto` straight into memory the
model will own (`read_tensor`) and written from the tensor's own memory (`write_safetensors`), so
loading a checkpoint peaks near the model's own size and saving near one tensor
(bench/load_checkpoint.py). The format is the documented one — an 8-byte little-endian header
length, a JSON header `{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`, then the raw
little-endian data — and files go both ways with the `safetensors` package (tests/test_precision.py).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..runtime import UserError

# Paddle is imported on first use only: light commands (merge's argument checks) import this module.

# safetensors dtype tag -> (our dtype name, numpy storage dtype). numpy has no bfloat16: its bits
# travel as uint16, which is also how Paddle's `.numpy()` returns bfloat16 and what
# `paddle.to_tensor(uint16 array)` reads back as bfloat16.
_FROM_TAG = {
    "F32": ("float32", np.float32), "F16": ("float16", np.float16), "BF16": ("bfloat16", np.uint16),
    "F64": ("float64", np.float64), "I64": ("int64", np.int64), "I32": ("int32", np.int32),
    "I16": ("int16", np.int16), "I8": ("int8", np.int8), "U8": ("uint8", np.uint8), "BOOL": ("bool", np.bool_),
}
_TO_TAG = {name: tag for tag, (name, _) in _FROM_TAG.items()}
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # "float32", "bfloat16", ...
    shape: tuple
    begin: int  # absolute file offsets of the data
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numpy_dtype(self):
        return _FROM_TAG[_TO_TAG[self.dtype]][1]


def dtype_of(tensor) -> str:
    return str(tensor.dtype).replace("paddle.", "")


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict]:
    """({name: TensorEntry}, metadata) of a safetensors file, validated; UserError if it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {length} exceeds the file")
            header = json.loads(handle.read(length))
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    metadata = header.pop("__metadata__", None) or {}
    base, entries, spans = 8 + length, {}, []
    for name, info in header.items():
        try:
            tag, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            dtype, np_dtype = _FROM_TAG[tag]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name!r} has an unsupported or malformed header entry {info!r}") from None
        if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize:
            raise UserError(f"{path}: tensor {name!r}: {end - begin} bytes do not hold shape {list(shape)} of {tag}")
        entries[name] = TensorEntry(name, dtype, shape, base + begin, base + end)
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise UserError(f"{path}: not a readable safetensors file (data offsets overlap or leave a gap)")
        covered = end
    if base + covered != size:
        raise UserError(f"{path}: truncated or padded safetensors file ({size} bytes, header says {base + covered})")
    return entries, metadata


class SafetensorsReader:
    """`with SafetensorsReader(path) as f: f.entries; f.read_tensor(name); f.read_numpy(name)`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries, self.metadata = read_header(self.path)
        self._handle = None

    def __enter__(self):
        self._handle = open(self.path, "rb", buffering=0)
        return self

    def __exit__(self, *exc):
        self._handle.close()
        self._handle = None

    def _read_into(self, entry: TensorEntry, buffer: np.ndarray) -> None:
        view, done = memoryview(buffer).cast("B"), 0
        self._handle.seek(entry.begin)
        while done < entry.nbytes:  # a single read() returns at most ~2 GB on Linux
            got = self._handle.readinto(view[done:])
            if not got:
                raise UserError(f"{self.path}: truncated while reading {entry.name!r}")
            done += got

    def read_numpy(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 as its uint16 bits)."""
        entry = self.entries[name]
        out = np.empty(entry.shape, dtype=entry.numpy_dtype)
        self._read_into(entry, out.reshape(-1).view(np.uint8))
        return out

    def read_tensor(self, name: str, place=None):
        """The tensor as a Paddle tensor in its stored dtype. On CPU it is read straight into the
        tensor's memory (no intermediate copy); elsewhere through one host array."""
        import paddle

        from .numpy_bridge import byte_view

        entry = self.entries[name]
        place = place if place is not None else paddle.framework._current_expected_place()
        if not place.is_cpu_place():
            return paddle.to_tensor(self.read_numpy(name), place=place)
        tensor = paddle.empty(list(entry.shape), dtype=entry.dtype)
        self._read_into(entry, byte_view(tensor))
        return tensor


def write_safetensors(path: Path, tensors: list, metadata: dict | None = None) -> int:
    """Atomically write [(name, paddle.Tensor | np.ndarray)] in the given order, one tensor's bytes
    at a time from the tensor's own memory (GPU tensors are copied to the host one at a time).
    numpy arrays must have a native dtype (use Paddle tensors for bfloat16). Returns data bytes."""
    header, offset, sources = {}, 0, []
    for name, value in tensors:
        if isinstance(value, np.ndarray):
            dtype = value.dtype.name
            if dtype not in _TO_TAG or value.dtype == np.uint16:
                raise ValueError(f"{name}: numpy dtype {value.dtype} has no safetensors tag here")
            shape, nbytes = value.shape, value.nbytes
        else:
            dtype, shape = dtype_of(value), tuple(value.shape)
            nbytes = int(np.prod(shape, dtype=np.int64)) * value.element_size()
        header[name] = {"dtype": _TO_TAG[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        sources.append(value)
        offset += nbytes
    header["__metadata__"] = {str(k): str(v) for k, v in (metadata or {}).items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors writer does
    with atomic_write(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for value in sources:
            host = _on_host(value)  # a GPU tensor's host copy lives exactly as long as its write
            handle.write(_bytes_of(host))
            del host
    return offset


def _on_host(value):
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    value = value.detach()
    if not value.place.is_cpu_place():
        value = value.cpu()
    return value if value.is_contiguous() else value.contiguous()


def _bytes_of(host) -> memoryview:
    if isinstance(host, np.ndarray):
        return memoryview(host.reshape(-1).view(np.uint8))
    from .numpy_bridge import byte_view

    return memoryview(byte_view(host))
