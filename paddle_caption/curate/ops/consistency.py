"""Image-text consistency from the captioner itself, and the filter on it.

Per row, how much the image raises the model's likelihood of the caption:

    consistency = mean log p(caption tokens | image, prompt) - mean log p(caption tokens | ablated image, prompt)

(an image-information gain, cf. VisualGPTScore and "visual information gain" data selection). A
caption written for another image gains little or loses; a caption with one wrong word loses at
that word. No CLIP: any model directory the kit can predict with scores its own data, in batches
through the supervised-positions head (`scoring.caption_logprobs`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..samples import load_image
from ..thresholds import check_bound
from .base import RangeFilter, register


@dataclass
class ConsistencyParams:
    model_dir: str = ""  # default: the recipe's model_dir
    min: object = None
    max: object = None
    max_length: int = 2048
    recompute: bool = False  # score rows that already carry a consistency (e.g. with another model)

    def validate(self, where: str) -> None:
        check_bound(self.min, f"{where}: min")
        check_bound(self.max, f"{where}: max")


def score_samples(predictor, samples: list[dict], captions: list[str] | None = None,
                  images: list | None = None, max_length: int = 2048) -> np.ndarray:
    """Write consistency, logp_image and logp_text into each sample's stats; returns the consistencies."""
    from ..scoring import caption_logprobs

    if images is None:
        images = [predictor.preprocess(load_image(s)) for s in samples]
    captions = [s["caption"] for s in samples] if captions is None else captions
    with_image, without = caption_logprobs(predictor, images, captions, max_length)
    gain = with_image - without
    for sample, g, a, b in zip(samples, gain, with_image, without):
        sample["stats"].update(consistency=round(float(g), 6), logp_image=round(float(a), 6),
                               logp_text=round(float(b), 6))
    return gain


@register
class ConsistencyFilter(RangeFilter):
    """Image-text consistency: mean caption log-prob with the image minus without it."""

    name = "consistency_filter"
    Params = ConsistencyParams
    uses_model = True
    stat = "consistency"

    def compute_stats_batch(self, samples):
        todo = [s for s in samples if s["caption"] and (self.params.recompute or "consistency" not in s["stats"])]
        if not todo:
            return
        predictor = self.ctx.models.get(self.params.model_dir)
        score_samples(predictor, todo, max_length=self.params.max_length)

    def process(self, sample):
        if not sample["caption"]:
            return "empty_caption"
        return super().process(sample)
