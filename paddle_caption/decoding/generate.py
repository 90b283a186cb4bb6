"""`generate`: the one-call decoding API (what the Predictor, evaluation and curation use): every
prompt of a batch decoded together in one `scheduler.ContinuousBatch`, greedy, sampling or beam
search, speculative with a drafter."""
from __future__ import annotations

import numpy as np
import paddle

from .batch import repeat_images
from .config import GenerationConfig
from .output_head import transposed_head
from .scheduler import ContinuousBatch, SpeculationStats


def generate(model, prompts: list[list[int]], images=None, config: GenerationConfig | None = None,
             drafter=None, stats: SpeculationStats | None = None) -> list[list[int]]:
    """Generate a continuation for each prompt; returns new token ids per prompt (stop id excluded),
    or `num_return_sequences` id lists per prompt, one prompt's after another.

    `images` is a float tensor [n_images, 3, S, S] matched to the prompts' `<img>` spans in order.
    `drafter` makes greedy decoding speculative (same tokens; sampling and beams ignore it);
    `stats` accumulates what it did.
    """
    cfg = config or GenerationConfig()
    if cfg.stop_ids is None or cfg.pad_id is None:
        raise ValueError("GenerationConfig needs stop_ids and pad_id: use config.with_tokenizer(tokenizer)")
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad(), transposed_head(model.lm_head):  # weights cannot change in here
            n = cfg.num_return_sequences
            if n > 1 and cfg.num_beams == 1:  # n samples per prompt: each prompt (and its images) n times
                images = repeat_images(model, prompts, images, [n] * len(prompts))
                prompts = [p for p in prompts for _ in range(n)]
            batch = ContinuousBatch(model, cfg.pad_id, drafter, stats)
            # One shared stream, drawn in row order: batched sampling reproduces earlier releases.
            rows = batch.add(prompts, images, [cfg] * len(prompts), rng=np.random.default_rng(cfg.seed))
            while batch:
                batch.step()
    finally:
        if was_training:
            model.train()
    if cfg.num_beams > 1:
        return [list(ids) for row in rows for ids in row.candidates]
    return [row.tokens for row in rows]
