"""Medusa-1 draft heads: K small heads on the frozen model's final hidden state (after `ln_f`).

Head k (0-based) reads the hidden state h_t that gives the model's next token x_{t+1} and predicts
x_{t+k+2}, the token k+1 places after it (Cai et al. 2024, "Medusa"). Each head is `num_layers`
residual blocks x + SiLU(W x + b) (W and b start at zero, so an untrained head is the identity),
then a projection onto the vocabulary:

- `draft_vocab` empty: the frozen `lm_head` itself, shared by every head (no projection weights of
  the heads' own: at hidden 4096 a private 151,936-wide output layer would be 622 M parameters);
- `draft_vocab` = N token ids (the N most frequent tokens of the training captions, FR-Spec style):
  each head has its own [hidden, N] projection, initialised from those columns of `lm_head`, so a
  draft costs N/V of a full head. Tokens outside the list are never drafted; verification always
  uses the full vocabulary, so the output stays exact.

The heads live beside the model, never inside its state: `draft_heads.safetensors` (the weights,
names `blocks.{k}.{j}.linear.weight|bias`, `proj.{k}.weight`) and `draft_heads.json` (format, config,
vocabulary). `MgenVLForCausalLM.from_pretrained` loads them when present as `model.draft_heads`,
outside the parameter registry (the base model's `state_dict()`, training and saving are
unchanged); the draft-heads fine-tune mode registers them as a sublayer to train them
(`train/draft_heads.py`). Drafting runs the heads in numpy (`HeadWeights`, `decoding/head_drafting.py`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import paddle
from paddle import nn

from ..runtime import UserError

WEIGHTS_FILE = "draft_heads.safetensors"
CONFIG_FILE = "draft_heads.json"
FORMAT = "paddle_caption.draft_heads/1"


@dataclass
class DraftHeadsConfig:
    hidden_size: int
    num_heads: int = 4
    num_layers: int = 1
    draft_vocab: list = field(default_factory=list)  # token ids; empty: the full vocabulary via lm_head

    def validate(self) -> "DraftHeadsConfig":
        if self.num_heads < 1 or self.num_layers < 1 or self.hidden_size < 1:
            raise ValueError("draft heads: num_heads, num_layers and hidden_size must be >= 1")
        if len(set(self.draft_vocab)) != len(self.draft_vocab) or any(int(t) < 0 for t in self.draft_vocab):
            raise ValueError("draft heads: draft_vocab must hold distinct non-negative token ids")
        return self


def build_heads(config: DraftHeadsConfig, lm_head_weight=None) -> "DraftHeads":
    """Fresh heads: zero residual blocks; restricted projections start from `lm_head_weight`'s
    [hidden, vocab] columns of the draft vocabulary."""
    heads = DraftHeads(config.validate())
    if config.draft_vocab:
        if lm_head_weight is None:
            raise ValueError("a restricted draft vocabulary starts from lm_head's columns: pass its weight")
        columns = paddle.gather(lm_head_weight.astype("float32"), paddle.to_tensor(
            np.asarray(config.draft_vocab, dtype=np.int64)), axis=1)
        for proj in heads.proj:
            proj.weight.set_value(columns)
    return heads


class ResBlock(nn.Layer):
    """x + SiLU(W x + b), W and b zero at the start (Medusa's block: an untrained head passes the
    hidden state through unchanged)."""

    def __init__(self, hidden: int):
        super().__init__()
        zero = paddle.ParamAttr(initializer=nn.initializer.Constant(0.0))
        self.linear = nn.Linear(hidden, hidden, weight_attr=zero, bias_attr=zero)

    def forward(self, x):
        return x + nn.functional.silu(self.linear(x))


class DraftHeads(nn.Layer):
    def __init__(self, config: DraftHeadsConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.blocks = nn.LayerList([nn.Sequential(*[ResBlock(hidden) for _ in range(config.num_layers)])
                                    for _ in range(config.num_heads)])
        self.proj = nn.LayerList([nn.Linear(hidden, len(config.draft_vocab), bias_attr=False)
                                  for _ in range(config.num_heads)] if config.draft_vocab else [])

    def head_logits(self, k: int, hidden, lm_head=None):
        """Head k's logits: [rows, N] over the draft vocabulary, or [rows, V] through `lm_head`."""
        features = self.blocks[k](hidden)
        if self.config.draft_vocab:
            return self.proj[k](features)
        if lm_head is None:
            raise ValueError("full-vocabulary draft heads project through lm_head: pass it")
        return lm_head(features)


# ---- disk ------------------------------------------------------------------------------------------
def save_draft_heads(heads, directory: str | os.PathLike) -> Path:
    """`draft_heads.safetensors` + `draft_heads.json` into `directory` (each written atomically)."""
    from ..files import write_json
    from .weights_io import save_safetensors

    directory = Path(directory)
    save_safetensors({name: p for name, p in heads.state_dict().items()}, directory / WEIGHTS_FILE)
    write_json(directory / CONFIG_FILE, heads_config_record(heads))
    return directory / WEIGHTS_FILE


def heads_config_record(heads) -> dict:
    """What `draft_heads.json` holds: the format tag and the heads' config (vocabulary included)."""
    return {"format": FORMAT, **asdict(heads.config)}


def has_draft_heads(directory) -> bool:
    return directory is not None and (Path(directory) / CONFIG_FILE).is_file()


def read_heads_config(path: str | os.PathLike) -> DraftHeadsConfig:
    """A `draft_heads.json` (or the directory holding one)."""
    path = Path(path)
    path = path / CONFIG_FILE if path.is_dir() else path
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable draft heads config ({err})") from None
    if not isinstance(meta, dict) or meta.pop("format", None) != FORMAT:
        raise UserError(f"{path}: not a draft heads config (format {FORMAT!r} expected)")
    try:
        return DraftHeadsConfig(**meta).validate()
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: {err}") from None


def load_draft_heads(directory: str | os.PathLike):
    """The `DraftHeads` layer saved in `directory` (float32, eval mode)."""
    from .weights_io import assign_state, load_safetensors

    directory = Path(directory)
    heads = DraftHeads(read_heads_config(directory))
    assign_state(heads.state_dict(), load_safetensors(directory / WEIGHTS_FILE), str(directory / WEIGHTS_FILE))
    heads.eval()
    return heads


class HeadWeights:
    """The heads as numpy arrays, for drafting (a few rows per step: numpy is the cheap path on a CPU,
    and it needs no model code, so an exported directory drafts the same way)."""

    def __init__(self, config: DraftHeadsConfig, arrays: dict):
        self.config = config
        self.blocks = [[(np.asarray(arrays[f"blocks.{k}.{j}.linear.weight"], np.float32),
                         np.asarray(arrays[f"blocks.{k}.{j}.linear.bias"], np.float32))
                        for j in range(config.num_layers)] for k in range(config.num_heads)]
        self.proj = [np.ascontiguousarray(np.asarray(arrays[f"proj.{k}.weight"], np.float32).T)
                     for k in range(config.num_heads)] if config.draft_vocab else None  # [N, hidden]
        self.vocab = np.asarray(config.draft_vocab, dtype=np.int64)

    @classmethod
    def from_layer(cls, heads) -> "HeadWeights":
        return cls(heads.config, {name: p.numpy() for name, p in heads.state_dict().items()})

    @classmethod
    def from_directory(cls, directory) -> "HeadWeights":
        from safetensors.numpy import load_file

        directory = Path(directory)
        config = read_heads_config(directory)
        try:
            arrays = load_file(str(directory / WEIGHTS_FILE))
        except Exception as err:
            raise UserError(f"{directory / WEIGHTS_FILE}: not a readable safetensors file ({err})") from None
        return cls(config, arrays)

    def features(self, hidden: np.ndarray, count: int | None = None) -> list[np.ndarray]:
        """The first `count` (default: all) heads' features [rows, hidden] (the residual blocks) for
        hidden [rows, hidden]."""
        out = []
        for blocks in self.blocks[:count]:
            x = hidden
            for weight, bias in blocks:
                z = x @ weight + bias
                x = x + z / (1.0 + np.exp(-z))  # SiLU
            out.append(x)
        return out
