"""`python tools/merge_local_params.py --model_name_or_path BASE --local_path|--lora_path CKPT --merge_model_path OUT`

Turns a training checkpoint into a full model directory that `MgenVLForCausalLM.from_pretrained`
and `predict_batch.py` load:

- `--local_path`: the base weights with every trained ("local") parameter replaced;
- `--lora_path`: the adapters merged into the base weights (W + A·B·α/r), no `lora` key left.

BASE is a model directory (a real Qwen-VL / Mgen-VL checkpoint) or, for a model trained from
scratch, the architecture JSON the run started from; the random initial weights are then rebuilt
from the run's `init_seed` and `dtype`. CKPT is a checkpoint directory or a run's output_dir (its
`final/`, else its newest complete checkpoint). Every key and shape is checked; a checkpoint of
another architecture is refused naming the first mismatching key. OUT is written to a temp directory
and renamed, so a killed merge never leaves a directory that looks complete.

OUT is written in the base model's dtype (a bfloat16 base gives a bfloat16 model; a from-scratch
architecture gives float32), or in `--dtype`. A base directory is loaded straight into that dtype
and nothing computes in it, so a bfloat16 base merges on a CPU: trained parameters are cast into it
(a float32 run merged into a bfloat16 base is rounded; `--dtype float32` keeps it exact), untouched
ones keep their bits, and LoRA's A·B is computed in float32 and then cast. A from-scratch
architecture is rebuilt in the run's dtype (its exact initial weights) and cast when written.

A `draft_heads` run's checkpoint (trained Medusa heads on a frozen base) merges the same way: OUT is
the base model with `draft_heads.safetensors` + `draft_heads.json` beside it; merging any other run
drops heads the base carried (they were trained for the old weights).

OUT also gets `draft_datastore/`, built from the run's training records (its train_config.json's
`train_records`, when that file is readable): what `predict_batch.py --speculative retrieval`
drafts from (`decoding/drafting.py`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..files import read_json_object, write_json
from ..runtime import UserError
from .config import resolve_path

TOKENIZER_FILES = ("qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
MERGE_INFO = "merge_info.json"

def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint dir as given, or the best one inside a run's output_dir."""
    from .run_checkpoints import FINAL_DIR, STATE_FILE, list_checkpoints

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint path does not exist")
    if not path.is_dir():
        raise UserError(f"{path}: a checkpoint is a directory, not a file")
    if (path / STATE_FILE).is_file() or (path / "lora_config.json").is_file():
        return path
    if (path / FINAL_DIR / STATE_FILE).is_file():
        return path / FINAL_DIR
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(f"{path}: no complete checkpoint here (expected {STATE_FILE}, {FINAL_DIR}/ or "
                    "checkpoint-*/)")

def _read_json(path: Path) -> dict | None:
    return read_json_object(path, "file") if path.is_file() else None

def read_run_config(ckpt: Path) -> dict:
    """The run's train_config.json (in the checkpoint, else its output_dir), or {}."""
    return _read_json(ckpt / "train_config.json") or _read_json(ckpt.parent / "train_config.json") or {}

def base_directory(base: str) -> Path | None:
    """BASE as a model directory, or None when it is an architecture JSON."""
    path = resolve_path(base)
    return path if path is not None and path.is_dir() else None

def build_base(base: str, ckpt: Path, allow_pickle: bool, dtype: str):
    """The model the run started from; returns (model, base_dir or None). A model directory loads
    into `dtype` (a cast per tensor: nothing computes in it here); a from-scratch architecture is
    rebuilt as the trainer built it, from the run's init_seed in the run's dtype."""
    from .model_init import initial_model

    path = base_directory(base)
    if path is not None:
        return initial_model(str(path), None, 0, allow_pickle, dtype=dtype)
    train_config = read_run_config(ckpt)
    if "init_seed" not in train_config:
        raise UserError(f"{ckpt}: no train_config.json with init_seed, so the from-scratch initial "
                        f"weights of {base} cannot be rebuilt; pass a model directory instead")
    # the trainer's init, bit for bit
    return initial_model(None, base, int(train_config["init_seed"]), dtype=train_config.get("dtype", "float32"))

def check_same_architecture(model, ckpt: Path) -> None:
    """Compare the checkpoint's saved model config with the base's, naming the first difference."""
    saved = _read_json(ckpt / "model_config.json")
    if saved is None:
        return  # a bare LoRA dir; the key/shape check below still guards
    own = model.config.to_dict()
    for key in sorted(set(own) | set(saved)):
        if key == "ablate_images":
            continue
        if own.get(key) != saved.get(key):
            raise UserError(f"{ckpt}: trained on a different architecture: config {key!r} is "
                            f"{saved.get(key)!r} there, {own.get(key)!r} in the base model")

def replace_local_params(model, ckpt: Path) -> int:
    from ..model.weights_io import assign_state, load_safetensors
    from .run_checkpoints import LOCAL_PARAMS

    weights = ckpt / LOCAL_PARAMS
    if not weights.is_file():
        hint = " (this is a LoRA checkpoint: use --lora_path)" if (ckpt / "lora").is_dir() else ""
        raise UserError(f"{ckpt}: no {LOCAL_PARAMS}{hint}")
    return assign_state(model.state_dict(), load_safetensors(weights), str(weights), subset=True)

def merge(base: str, out: Path, local_path: str | None = None, lora_path: str | None = None,
          allow_pickle: bool = False, max_shard_bytes: int = 2 << 30, dtype: str | None = None,
          log=print) -> Path:
    """Write OUT (see the module docstring); `dtype` None: the base model's (float32 from scratch)."""
    from ..model.draft_heads import build_heads, has_draft_heads, read_heads_config, save_draft_heads
    from ..model.mgen_vl import HEADS_PREFIX
    from ..model.weights_io import checkpoint_dtype, save_model_state
    from ..model.precision import dtype_name

    ckpt = resolve_checkpoint(Path(local_path or lora_path))
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MERGE_INFO).is_file())):
        raise UserError(f"--merge_model_path {out}: exists and is not an earlier merge output; "
                        "choose a new directory")
    base_dir = base_directory(base)
    out_dtype = dtype_name(dtype) if dtype else (
        checkpoint_dtype(base_dir, allow_pickle) if base_dir is not None else "float32")
    model, base_dir = build_base(base, ckpt, allow_pickle, out_dtype)
    check_same_architecture(model, ckpt)
    init_from = read_run_config(ckpt).get("init_from")
    if init_from:  # the run started from another checkpoint's weights: the same start first
        from .model_init import apply_init_from

        apply_init_from(model, init_from, base, allow_pickle, log)
    heads_run = not lora_path and has_draft_heads(ckpt)
    # a draft_heads run: fresh heads of its config take its trained weights below; any other run
    # drops heads the base carried (they were trained for the base's weights, not the new ones)
    model.attach_draft_heads(build_heads(read_heads_config(ckpt), model.lm_head.weight) if heads_run else None,
                             trainable=True)
    if lora_path:
        from .lora import merge_lora

        lora_dir = ckpt / "lora" if (ckpt / "lora").is_dir() else ckpt
        state, replaced = merge_lora(model, lora_dir, allow_pickle=allow_pickle)
        mode = "lora"
    else:
        replaced, mode = replace_local_params(model, ckpt), "draft_heads" if heads_run else "local"
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(HEADS_PREFIX)}
    saved_model_config = _read_json(ckpt / "model_config.json") or {}
    model.config.ablate_images = bool(saved_model_config.get("ablate_images", False))

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_state(state, tmp, max_shard_bytes=max_shard_bytes, dtype=out_dtype)
    model.config.save_pretrained(tmp)
    if getattr(model, "draft_heads", None) is not None:
        save_draft_heads(model.draft_heads, tmp)  # beside the model, float32 (model/draft_heads.py)
    if base_dir is not None:  # the base model's tokenizer files travel with it
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
    for name in ("prompt.json", "train_config.json"):
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, tmp / name)
    build_draft_datastore(tmp, model.config, base_dir, ckpt, log)
    step = (_read_json(ckpt / "trainer_state.json") or {}).get("step")
    info = {"base": str(base), "checkpoint": str(ckpt), "mode": mode, "step": step, "dtype": out_dtype,
            "tensors_written": len(state), ("layers_adapted" if mode == "lora" else "params_replaced"): replaced}
    write_json(tmp / MERGE_INFO, info)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"merged {mode} checkpoint {ckpt} (step {step}) into {base} -> {out} "
        f"({len(state)} tensors, {out_dtype})")
    return out

def build_draft_datastore(out: Path, model_config, base_dir: Path | None, ckpt: Path, log=print) -> bool:
    """OUT/draft_datastore from the run's training records; a note (not an error) when there are
    none to read (e.g. a LoRA directory without its run, or records moved away)."""
    from ..decoding.datastore import DATASTORE_DIR, DraftDatastore
    from ..tokenizer import QWenVLTokenizer

    train_config = read_run_config(ckpt)
    records = resolve_path(train_config.get("train_records") or None)
    if records is None or not records.is_file():
        log(f"no draft datastore: the run's training records ({train_config.get('train_records')!r}) "
            "are not readable here; predict_batch.py --draft_source builds one on the fly")
        return False
    tokenizer = QWenVLTokenizer.for_model(model_config, base_dir)
    store = DraftDatastore.from_file(records, tokenizer)
    store.save(out / DATASTORE_DIR)
    log(f"draft datastore: {store.info['captions']} captions of {records} ({store.info['tokens']} tokens)")
    return True
