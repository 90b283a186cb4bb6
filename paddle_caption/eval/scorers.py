"""Scores for in-training evaluation beyond the caption metrics, chosen by name in a TrainConfig.

The trainer knows no dataset: a config names the extra scorers it wants (`eval_extra_scores`) and
this registry imports them only then. Each scorer maps (predictions {id: caption}, references
{id: [captions]}) to {name: float}.
"""
from __future__ import annotations

import importlib

EXTRA_SCORERS = {
    # field accuracy (style, background, colour, ...) for the synthetic ad world's caption grammar
    "synthetic_fields": "paddle_caption.eval.fields:field_scores",
}


def extra_scores(names: list[str], predictions: dict, references: dict) -> dict:
    scores = {}
    for name in names:
        module, function = EXTRA_SCORERS[name].split(":")
        scores.update(getattr(importlib.import_module(module), function)(predictions, references))
    return scores
