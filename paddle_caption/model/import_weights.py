"""`python tools/convert_checkpoint.py SRC DST [--dtype bfloat16] [--allow_pickle] [--max_shard_gb 2]`

Turns the checkpoints users have into the model directory this kit loads: config.json, the
tokenizer files (qwen.tiktoken, tokenizer_config.json) and the weights as sharded safetensors in
the chosen dtype (default: the source's). SRC is one of

- PaddleMIX's Qwen-VL / Mgen-VL: `model_state.pdparams` (or shards listed in
  `model_state.pdparams.index.json`) with its config.json. The names are already ours. The file is
  a pickle, read by an unpickler that admits only numpy's array rebuilders
  (`model/pickle_reader.py`): a file that names anything else is refused by name, and read with
  Paddle's own unpickler only with --allow_pickle (for a file you vet).
- Hugging Face Qwen-VL / Qwen-VL-Chat: `model-0000i-of-0000n.safetensors` + index, PyTorch names
  (`transformer.h.N...`, `transformer.visual...`) and orientations (Linear weights [out, in],
  MultiheadAttention's in_proj [3D, D]): renamed and transposed by the table in
  `model/hf_layout.py`, read from the shards with numpy alone (no PyTorch; bfloat16 travels as its
  uint16 bits and is re-typed by Paddle). The repository ships `pytorch_model-0000i-of-0000n.bin`
  (+ `pytorch_model.bin.index.json`), PyTorch zip pickles: read without torch and without running
  pickle code (`model/pickle_reader.py`: only tensor, storage and dict rebuilders are admitted,
  each storage memory-mapped from the zip).
- A directory already in our layout (re-typed and re-sharded).

Every name and shape is checked against the architecture in SRC's config.json before the first
tensor is converted (safetensors) or as each pickle shard arrives. Memory: source tensors are read
one at a time (a pickle shard whole, as the format requires) and an output shard is written as soon
as it is full. DST is built in a temp directory and renamed, so a failed conversion leaves nothing
that looks complete.
"""
from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..runtime import UserError

INFO_FILE = "conversion_info.json"
CONFIG_NAMES = ("config.json", "model_config.json")


def read_source_config(src: Path):
    from .hf_layout import config_from_hf

    for name in CONFIG_NAMES:
        path = src / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"{path}: not valid JSON ({err})") from None
            return config_from_hf(data, str(path))
    raise UserError(f"{src}: no {' or '.join(CONFIG_NAMES)}: the architecture of the weights is unknown")


def detect_layout(names, source: str) -> str:
    """"hf" for Hugging Face names, "ours" for PaddleMIX/ours; UserError naming a key otherwise."""
    from .hf_layout import is_hf_name

    names = list(names)
    if any(is_hf_name(n) for n in names):
        return "hf"
    if any(n.startswith(("visual.", "transformer.llm.")) for n in names):
        return "ours"
    raise UserError(f"{source}: neither a Hugging Face Qwen-VL nor a PaddleMIX Qwen-VL checkpoint "
                    f"(first key {sorted(names)[0] if names else 'none'!r})")


def target_name(name: str, layout: str) -> tuple[str, bool] | None:
    from .hf_layout import hf_to_ours

    return hf_to_ours(name) if layout == "hf" else (name, False)


def convert(src, dst, dtype: str | None = None, allow_pickle: bool = False,
            max_shard_bytes: int = 2 << 30, progress: bool = True, log=print) -> Path:
    from tqdm import tqdm

    import paddle
    from ..tokenizer import QWenVLTokenizer
    from .weights_io import ShardWriter, check_state, read_header, weight_files
    from .mgen_vl import MgenVLForCausalLM

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"{src}: not a model directory")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"{dst}: exists and is not empty; choose a new directory")
    config = read_source_config(src)
    files = weight_files(src, allow_pickle)  # listing only; nothing is unpickled yet
    pickled = files[0].suffix.lower() != ".safetensors"
    source_format = ("safetensors" if not pickled else
                     "pytorch" if files[0].suffix.lower() in (".bin", ".pt", ".pth") else "pickle")
    if pickled:
        log(f"{src}: {'PyTorch' if source_format == 'pytorch' else 'Paddle'} pickle checkpoint, {len(files)} "
            "file(s), read as arrays only (model/pickle_reader.py)")
    own = MgenVLForCausalLM.from_config(config, dtype="float32", lazy=True).state_dict()

    headers, layout = {}, None
    if not pickled:
        for file in files:
            headers.update(read_header(file)[0])
        layout = detect_layout(headers, str(src))
        mapped = {}
        for name, entry in headers.items():
            target = target_name(name, layout)
            if target:
                shape = entry.shape[::-1] if target[1] else entry.shape
                mapped[target[0]] = SimpleNamespace(shape=list(shape))
        check_state(own, mapped, str(src))
        stored = Counter()
        for entry in headers.values():
            stored[entry.dtype] += entry.nbytes
        dtype = dtype or stored.most_common(1)[0][0]

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardWriter(tmp, max_shard_bytes)
    total = sum(e.nbytes for e in headers.values()) if headers else None
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress, file=sys.stderr,
               desc="convert")
    seen = set()
    try:
        for file, name, value in _source_tensors(files, allow_pickle, paddle):
            if layout is None:  # pickle: decided on its first shard's names
                layout = detect_layout([name], str(src))
            target = target_name(name, layout)
            if target is None:
                continue
            our_name, transpose = target
            if our_name not in own:
                raise UserError(f"{file}: unexpected key {name!r} (checkpoint of a different architecture?)")
            if transpose:
                value = value.t()
            if list(value.shape) != list(own[our_name].shape):
                raise UserError(f"{file}: key {name!r} has shape {list(value.shape)}, the model expects "
                                f"{list(own[our_name].shape)}")
            if dtype is None:
                dtype = str(value.dtype).replace("paddle.", "")
            writer.add(our_name, value if str(value.dtype) == f"paddle.{dtype}" else value.astype(dtype))
            seen.add(our_name)
            bar.update(int(value.numel()) * value.element_size() if total is None else headers[name].nbytes)
        missing = sorted(set(own) - seen)
        if missing:
            raise UserError(f"{src}: missing key {missing[0]!r} (checkpoint of a different architecture?)")
        shards = writer.close()
        config.save_pretrained(tmp)
        QWenVLTokenizer.for_model(config, src).save_pretrained(tmp)
        info = {"source": str(src), "layout": "huggingface" if layout == "hf" else "paddlemix",
                "format": source_format, "dtype": dtype, "tensors": len(seen),
                "bytes": writer.total_bytes, "shards": len(shards)}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bar.close()
    if dst.exists():
        dst.rmdir()
    tmp.rename(dst)
    log(f"converted {info['tensors']} tensors ({info['bytes'] / 2**30:.2f} GiB {dtype}) from the "
        f"{info['layout']} {info['format']} checkpoint {src} -> {dst} ({len(shards)} shard(s))")
    return dst


def _source_tensors(files, allow_pickle: bool, paddle):
    """(file, name, paddle tensor in its stored dtype), one tensor at a time."""
    from .weights_io import load_file_state
    from .safetensors_io import SafetensorsReader

    for file in files:
        if file.suffix.lower() == ".safetensors":
            with SafetensorsReader(file) as reader:
                for entry in sorted(reader.entries.values(), key=lambda e: e.begin):
                    # numpy holds bfloat16 as uint16, which paddle.to_tensor reads back as bfloat16
                    yield file, entry.name, paddle.to_tensor(reader.read_numpy(entry.name))
        else:
            state = load_file_state(file, allow_pickle)
            for name in list(state):
                value = state.pop(name)
                yield file, name, value if isinstance(value, paddle.Tensor) else paddle.to_tensor(np.asarray(value))
            del state
