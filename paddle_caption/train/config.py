"""TrainConfig: one JSON file fully describes a training run; `--key value` overrides any field.

Unknown keys and wrong types are one-line errors raised before anything heavy is imported
(`typed_config`). Paths in a config are taken as given (relative to the working directory) and,
where nothing exists there, among the kit's packaged files (`resources`): `config/model/tiny.json`
works from any directory, installed or not.
"""
from __future__ import annotations

import hashlib
import json

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from .. import resources
from ..files import read_json_object
from ..runtime import UserError
from ..model.precision import DTYPES
from ..typed_config import from_mapping, parse_overrides
from ..data.augment import AugmentConfig
from .scst import SCSTConfig

SHARDING = ("none", "stage1", "stage2")


@dataclass
class DraftHeadsTraining:
    """The `draft_heads` fine-tune mode's settings (train/draft_heads.py)."""

    num_heads: int = 4  # head k drafts the token k+2 places after the hidden state's position
    num_layers: int = 1  # residual blocks per head
    draft_vocab_size: int = 8192  # the N most frequent caption tokens; 0: full vocabulary via lm_head
    targets: str = "self"  # "self": the model's own greedy tokens (teacher-forced); "labels": the captions'


@dataclass
class TrainConfig:
    RENAMED_KEYS: ClassVar[dict] = {"precision": "dtype (float32 | bfloat16 | float16)"}

    # ---- model: a pretrained directory, or an architecture JSON trained from scratch ---------------
    model_name_or_path: str | None = None
    model_config: str | None = None
    init_seed: int = 0
    # a training checkpoint (checkpoint-N/, final/, or a run's output_dir) of a run on this same
    # start model, applied before this run's freezing/LoRA: e.g. SCST from a cross-entropy run's
    # checkpoint without merging it first (model_init.apply_init_from; merging replays it)
    init_from: str | None = None
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
    # caption-aware augmentation of the training images (data/augment.py); all zeros: off
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    # ---- what trains ----------------------------------------------------------------------------
    # "full": every parameter; "partial": the `trainable` globs minus the `frozen` globs;
    # "lora": LoRA adapters on `lora_target_modules`, everything else frozen.
    finetune_mode: str = "full"  # full | partial | lora | draft_heads (base frozen, Medusa heads train)
    draft_heads: DraftHeadsTraining = field(default_factory=DraftHeadsTraining)
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

    # ---- objective (train/objectives.py): "cross_entropy" | "scst" (self-critical CIDEr-D, its
    # settings in the "scst" block: train/scst.py's SCSTConfig)
    objective: str = "cross_entropy"
    scst: SCSTConfig = field(default_factory=SCSTConfig)

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
    # float32 | bfloat16 | float16: the model's dtype (model/precision.py); bfloat16/float16 train with
    # Paddle's O2 and float32 master weights (mixed_precision.py) and need a GPU
    dtype: str = "float32"
    recompute: bool = False  # activation checkpointing per decoder and ViT layer (model/recompute.py)
    num_threads: int = 0  # CPU threads for Paddle (0 = all cores)
    # Optimizer-state sharding over the ranks of a launched run (ZeRO), Paddle's engines:
    # "stage1" = fleet's DygraphShardingOptimizer (optimizer states; runs on CPU/gloo too),
    # "stage2" = paddle.distributed.sharding.group_sharded_parallel level "os_g" (states and
    # gradients; GPU/XPU only). "none" = plain data parallel. See train/parallel.py.
    sharding: str = "none"

    # ---- evaluation, logging, checkpoints -----------------------------------------------------------
    eval_steps: int = 0  # 0 = only at the end
    eval_minutes: float = 0.0  # with a time budget: evaluate every N minutes
    eval_loss_samples: int = 64
    eval_caption_samples: int = 32
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 16
    # Scores computed on the evaluation captions besides CIDEr-D/BLEU/ROUGE-L, by name (see
    # paddle_caption/eval/scorers.py), e.g. ["synthetic_fields"] for the demo's synthetic world.
    eval_extra_scores: list = field(default_factory=list)
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
        choices = {"finetune_mode": ("full", "partial", "lora", "draft_heads"), "dtype": DTYPES, "sharding": SHARDING,
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
        heads = self.draft_heads
        if heads.targets not in ("self", "labels"):
            raise UserError(f"config: draft_heads.targets must be 'self' or 'labels', not {heads.targets!r}")
        if heads.num_heads < 1 or heads.num_layers < 1 or heads.draft_vocab_size < 0:
            raise UserError("config: draft_heads needs num_heads >= 1, num_layers >= 1, draft_vocab_size >= 0")
        from ..eval.scorers import EXTRA_SCORERS
        from .objectives import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise UserError(f"config: objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.finetune_mode == "draft_heads" and self.objective not in ("cross_entropy", "draft_heads"):
            raise UserError(f"config: finetune_mode 'draft_heads' trains the heads with their own loss; "
                            f"objective {self.objective!r} does not apply")
        self.scst.validate()
        self.augment.validate()

        for name in self.eval_extra_scores:
            if name not in EXTRA_SCORERS:
                raise UserError(f"config: eval_extra_scores: unknown scorer {name!r} "
                                f"(known: {', '.join(EXTRA_SCORERS)})")
        for item in self.lr_scale:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str)
                    or isinstance(item[1], bool) or not isinstance(item[1], (int, float)) or item[1] < 0):
                raise UserError(f"config: lr_scale entries must be [glob, factor >= 0], not {item!r}")
        return self

    @property
    def objective_name(self) -> str:
        """The objective a run trains with: the draft_heads mode's own, else `objective`."""
        return "draft_heads" if self.finetune_mode == "draft_heads" else self.objective

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        return from_mapping(cls, data, source)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "TrainConfig":
        """A config file (as given, else among the packaged configs) plus `--key value` overrides."""
        path = resources.find_file(path, "config file")
        data = read_json_object(path, "config")
        data.update(parse_overrides(overrides or [], cls))
        return cls.from_dict(data, str(path)).validate()


def resolve_path(path: str | None) -> Path | None:
    """A path named in a config: as given if it exists, else among the packaged files."""
    return resources.resolve(path)


# Settings that do not change the trajectory: they may differ when a run resumes.
VOLATILE_KEYS = {"output_dir", "progress", "logging_steps", "eval_steps", "eval_minutes", "save_steps",
                 "save_minutes", "save_total_limit", "visualdl", "num_workers", "num_threads",
                 "max_train_minutes", "eval_loss_samples", "eval_caption_samples", "eval_max_new_tokens",
                 "eval_batch_size", "eval_extra_scores", "val_records"}


def config_fingerprint(cfg: TrainConfig) -> str:
    """A hash of the fields that change the trajectory; budget/logging/eval settings may differ."""
    stable = {k: v for k, v in cfg.to_dict().items() if k not in VOLATILE_KEYS}
    return hashlib.sha1(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]
