"""Training objectives: what loss a training step minimises, chosen by the config's `objective`.

One registry (`OBJECTIVES`: name -> "module:Class", imported only when chosen). An objective is
built once per run from the trainer after its set-up (`objective(trainer)`: it may read the model,
tokenizer, prompt template, training set and config) and has

    loss(train_module, batch, step) -> (loss tensor, extras {name: float})
        the micro-batch's loss to backpropagate; the trainer averages each extra over the logging
        window and writes it in the train record of log.jsonl;
    state_dict() -> dict / set_state_dict(dict)
        what a checkpoint must carry for a resumed run to be bit-identical (JSON-serialisable;
        saved as `objective_state.json` when not empty, see run_checkpoints.py).

The trainer seeds Paddle from (seed, step, micro-batch, rank) before every call, so randomness
drawn from Paddle inside `loss` needs no state of its own.
"""
from __future__ import annotations

import importlib

import numpy as np

OBJECTIVES = {
    # today's loss: mean next-token cross-entropy over the reference caption's tokens
    "cross_entropy": "paddle_caption.train.objectives:CrossEntropy",
    # self-critical sequence training on CIDEr-D (train/scst.py, config block "scst")
    "scst": "paddle_caption.train.scst:SCSTObjective",
    # Medusa draft heads on the frozen model: what `finetune_mode: "draft_heads"` trains with
    # (train/draft_heads.py, config block "draft_heads")
    "draft_heads": "paddle_caption.train.draft_heads:DraftHeadsObjective",
}


class CrossEntropy:
    def __init__(self, trainer):
        pass

    def loss(self, train_module, batch, step: int):
        return train_module(batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]), {}

    def state_dict(self) -> dict:
        return {}

    def set_state_dict(self, state: dict) -> None:
        pass


def build_objective(name: str, trainer):
    """The objective `name` (a key of OBJECTIVES; the config checked it) built for `trainer`."""
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)(trainer)


def mean_extras(window: list[dict]) -> dict:
    """Each extra averaged over the logging window's micro-batches that have it."""
    keys = dict.fromkeys(k for extras in window for k in extras)
    return {k: float(np.mean([e[k] for e in window if k in e])) for k in keys}
