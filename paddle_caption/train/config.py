"""TrainConfig: one JSON file fully describes a training run; `--key value` overrides any field.

Unknown keys and wrong types are one-line errors raised before anything heavy is imported.
Relative paths in a config file are resolved against the current directory first, then the
repository root (so `config/...` works from anywhere inside the checkout).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..model.precision import DTYPES
from ..runtime import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARDING = ("none", "stage1", "stage2")
RENAMED = {"precision": "dtype (float32 | bfloat16 | float16)"}


def unknown_key(key: str) -> str:
    hint = f"; it was renamed to {RENAMED[key]}" if key in RENAMED else ""
    return f"unknown key {key!r}{hint}"


@dataclass
class TrainConfig:
    # ---- model: a pretrained directory, or an architecture JSON trained from scratch ---------------
    model_name_or_path: str | None = None
    model_config: str | None = None
    init_seed: int = 0
    allow_pickle: bool = False
    ablate_images: bool = False  # the no-image ablation: image rows are zeros (the baseline's bug)

    # ---- data ------------------------------------------------------------------------------------
    train_records: str = ""
    val_records: str | None = None
    prompt_file: str = "config/prompts/style_aware.txt"
    system_file: str | None = None
    max_length: int = 2048
    num_workers: int = 1
    group_by_length: bool = True

    # ---- what trains ----------------------------------------------------------------------------
    # "full": every parameter; "partial": the `trainable` globs minus the `frozen` globs;
    # "lora": LoRA adapters on `lora_target_modules`, everything else frozen.
    finetune_mode: str = "full"
    trainable: list = field(default_factory=lambda: ["*"])
    frozen: list = field(default_factory=list)
    # [[glob, factor], ...]: these trainable parameters learn at factor x learning_rate (last match
    # wins; every glob must match a trainable parameter). E.g. [["visual.*", 0.1]].
    lr_scale: list = field(default_factory=list)
    lora_target_modules: list = field(default_factory=lambda: [
        r"transformer\.llm\.h\.\d+\.attn\.c_attn", r"transformer\.llm\.h\.\d+\.attn\.c_proj",
        r"transformer\.llm\.h\.\d+\.mlp\.w1", r"transformer\.llm\.h\.\d+\.mlp\.w2"])
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05

    # ---- optimiser and schedule -------------------------------------------------------------------
    learning_rate: float = 1e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_ratio: float = 0.01
    min_lr_ratio: float = 0.0
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    # Wall-clock budget in minutes (0 = none). The schedule runs on max(step, time) progress, so
    # the run ends on time with the learning rate fully decayed, whatever the machine's speed.
    max_train_minutes: float = 0.0
    seed: int = 42  # data order and per-step RNG

    # ---- precision, memory and hardware ------------------------------------------------------------
    dtype: str = "float32"  # float32 | bfloat16 | float16: the model's dtype (model/precision.py)
    recompute: bool = False  # activation checkpointing per decoder and ViT layer (model/recompute.py)
    sharding: str = "none"  # none | stage1 | stage2: optimizer state (stage2: + gradients) split across GPUs
    num_threads: int = 0  # CPU threads for Paddle (0 = all cores)

    # ---- evaluation, logging, checkpoints -----------------------------------------------------------
    eval_steps: int = 0  # 0 = only at the end
    eval_minutes: float = 0.0  # with a time budget: evaluate every N minutes
    eval_loss_samples: int = 64
    eval_caption_samples: int = 32
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 16
    logging_steps: int = 10
    save_steps: int = 0  # 0 = only at the end
    save_minutes: float = 0.0
    save_total_limit: int = 2
    output_dir: str = "checkpoints/run"
    visualdl: bool = False
    progress: bool = True

    # ---- validation -------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        if bool(self.model_name_or_path) == bool(self.model_config):
            raise UserError("config: give exactly one of model_name_or_path (pretrained dir) or "
                            "model_config (architecture JSON, trained from scratch)")
        if not self.train_records:
            raise UserError("config: train_records is required")
        choices = {"finetune_mode": ("full", "partial", "lora"), "dtype": DTYPES, "sharding": SHARDING,
                   "lr_scheduler": ("cosine", "linear", "constant")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"config: {key} must be one of {', '.join(allowed)}, not {getattr(self, key)!r}")
        positive = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "max_length", "lora_r")
        for key in positive:
            if getattr(self, key) <= 0:
                raise UserError(f"config: {key} must be > 0")
        if self.max_steps <= 0 and self.num_train_epochs <= 0 and self.max_train_minutes <= 0:
            raise UserError("config: set max_steps, num_train_epochs or max_train_minutes")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("config: warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        for item in self.lr_scale:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                    or isinstance(item[1], bool) or not isinstance(item[1], (int, float)) or item[1] < 0):
                raise UserError(f"config: lr_scale entries must be [glob, factor >= 0], not {item!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in data.items():
            if key.startswith("_"):  # "_comment" keys document a config file
                continue
            if key not in hints:
                raise UserError(f"{source}: {unknown_key(key)}")
            values[key] = _check_type(key, value, hints[key], source)
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "TrainConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: a config must be a JSON object")
        data.update(parse_overrides(overrides or [], typing.get_type_hints(cls)))
        return cls.from_dict(data, str(path)).validate()


def parse_overrides(args: list[str], hints: dict) -> dict:
    """`--key value` pairs -> {key: typed value}. Lists take a JSON array; bools true/false."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"override {arg!r}: expected --key value")
        key, _, inline = arg[2:].partition("=")
        if key not in hints:
            raise UserError(f"override --{key}: {unknown_key(key)}")
        if inline:
            raw = inline
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 2
        elif _base_type(hints[key]) is bool:  # a bare flag means true
            raw = "true"
            i += 1
        else:
            raise UserError(f"override --{key}: missing value")
        out[key] = _parse_value(key, raw, hints[key])
    return out


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return args[0]
    return typing.get_origin(hint) or hint


def _parse_value(key: str, raw: str, hint):
    base = _base_type(hint)
    try:
        if raw.lower() in ("none", "null") and type(None) in typing.get_args(hint):
            return None
        if base is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if base in (int, float):
            return base(raw)
        if base is list:
            value = json.loads(raw)
            if not isinstance(value, list):
                raise ValueError
            return value
        return raw
    except ValueError:
        raise UserError(f"override --{key}: {raw!r} is not a valid {base.__name__}") from None


def _check_type(key: str, value, hint, source: str):
    base = _base_type(hint)
    optional = type(None) in typing.get_args(hint)
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise UserError(f"{source}: key {key!r} must be true/false, not {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{source}: key {key!r} must be an integer, not {value!r}")
    if not isinstance(value, base):
        raise UserError(f"{source}: key {key!r} must be {base.__name__}, not {type(value).__name__} {value!r}")
    return value


def resolve_path(path: str | None) -> Path | None:
    """A config path: as given if it exists, else relative to the repository root."""
    if not path:
        return None
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    candidate = REPO_ROOT / p
    return candidate if candidate.exists() else p
