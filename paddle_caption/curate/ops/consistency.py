"""Image-text consistency from the captioner itself, and the filter on it.

Per row, how much more likely the model finds the caption under its own image than under images
it was not written for:

    consistency = mean log p(caption tokens | its image, prompt)
                  - mean over k other images of mean log p(caption tokens | other image, prompt)

(an image-information gain, cf. VisualGPTScore and "visual information gain" data selection). A
caption written for another image gains little or loses; a caption with one wrong word loses at
that word. No CLIP: any model directory the kit can predict with scores its own data, in batches
through the supervised-positions head (`scoring.caption_logprobs`).

Why reference images and not the no-image ablation (zeros in the image rows, `baseline: "ablated"`,
still available): a model never sees zeroed image rows in training, so its no-image likelihood is
off its training distribution, and two seed models trained alike (same steps, losses equal to 3
decimals) scored it with a correlation of only 0.81 across the rows; the filter's AUC on the
mismatched captions moved between 0.87 and 0.92 with it. Real images are in distribution: with 3
other images per row as the baseline both seeds gave AUC 0.93 (README, "Data curation").

The other images come from a reference pool fixed for the stage: `reference_pool` rows of the
stage input at evenly spaced positions (`baseline_references`), the same for every rank of a
sharded run. Each row draws its k from the pool by a hash of its id, so the score does not depend
on which batch or process the row landed in, and different rows are compared with different
images (one small fixed set for all rows measured worse, AUC 0.89: a caption that happens to fit
one of its few images is penalised every time). A row never serves as its own reference.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ...runtime import UserError
from ..samples import load_image
from ..thresholds import check_bound
from .base import RangeFilter, register

BASELINES = ("other_images", "ablated")


@dataclass
class BaselineParams:
    """What a caption's likelihood under its own image is compared with (consistency_filter and
    pseudo_label score alike)."""

    baseline: str = "other_images"  # other_images | ablated
    baseline_images: int = 4  # k other images per row (other_images)
    reference_pool: int = 64  # rows of the stage input they are drawn from

    def validate_baseline(self, where: str) -> None:
        if self.baseline not in BASELINES:
            raise UserError(f"{where}: baseline is one of {', '.join(BASELINES)}, not {self.baseline!r}")
        if self.baseline == "other_images" and not 1 <= self.baseline_images < self.reference_pool:
            raise UserError(f"{where}: baseline_images must be >= 1 and below reference_pool "
                            f"({self.baseline_images}, {self.reference_pool})")


@dataclass
class ConsistencyParams(BaselineParams):
    model_dir: str = ""  # default: the recipe's model_dir
    min: object = None
    max: object = None
    max_length: int = 2048
    recompute: bool = False  # score rows that already carry a consistency (e.g. with another model)

    def validate(self, where: str) -> None:
        check_bound(self.min, f"{where}: min")
        check_bound(self.max, f"{where}: max")
        self.validate_baseline(where)


def pick_references(samples, count: int, k: int) -> list[dict]:
    """k samples at evenly spaced positions of `samples` (`count` of them): the first one at or
    after each position with a caption and an image that decodes."""
    from ...data.images import ImageRejected

    targets = [int((j + 0.5) * count / k) for j in range(k)]
    chosen: list[dict] = []
    for position, sample in enumerate(samples):
        if len(chosen) == k:
            break
        if position < targets[len(chosen)] or not sample.get("caption"):
            continue
        try:
            load_image(sample)
        except (ImageRejected, ValueError, OSError):
            continue
        chosen.append(sample)
    return chosen


def baseline_references(op, predictor) -> "References | None":
    """The op's reference pool, read once from its stage input; None for the ablated baseline."""
    if op.params.baseline == "ablated":
        return None
    if getattr(op, "_references", None) is None:
        from ..samples import iter_samples

        source = op.ctx.stage_input
        count = sum(1 for _ in iter_samples(source))
        refs = pick_references(iter_samples(source), count, op.params.reference_pool)
        if len(refs) < 2:  # one reference would be no reference for itself
            raise UserError(f"{op.name}: baseline other_images needs at least 2 rows with a usable image "
                            f"in {source} (or use baseline: ablated)")
        from ..scoring import image_features

        op._references = References([s["id"] for s in refs],
                                    image_features(predictor, [predictor.preprocess(load_image(s)) for s in refs],
                                                   op.ctx.batch_size),
                                    op.params.baseline_images)
    return op._references


class References:
    """A pool of reference images — their vision tower outputs, computed once: every row pairs its
    caption with k of them — and the rule that gives each row its k."""

    def __init__(self, ids: list[str], features, k: int):
        self.ids, self.features, self.k = ids, features, k

    def for_row(self, row_id: str | None) -> list[int]:
        """Pool indices for a row: a pseudo-random draw seeded by the row's id (the same in every
        process and run), without the row's own image; all of the pool if it is too small."""
        others = [j for j, ref_id in enumerate(self.ids) if ref_id != row_id]
        if len(others) <= self.k:
            return others
        seed = int.from_bytes(hashlib.blake2b(str(row_id).encode("utf-8"), digest_size=8).digest(), "little")
        return sorted(np.random.default_rng(seed).choice(others, self.k, replace=False).tolist())


def score_samples(predictor, samples: list[dict], captions: list[str] | None = None,
                  images: list | None = None, max_length: int = 2048,
                  references: References | None = None) -> np.ndarray:
    """Write consistency, logp_image and the baseline's log-prob into each sample's stats
    (`logp_other_images` with `references`, `logp_text` without: the ablated image); returns the
    consistencies. A sample's "id" keeps its own image out of its references."""
    from ..scoring import caption_logprobs

    if images is None:
        images = [predictor.preprocess(load_image(s)) for s in samples]
    captions = [s["caption"] for s in samples] if captions is None else captions
    with_image = caption_logprobs(predictor, images, captions, max_length)
    if references is None:
        key, baseline = "logp_text", caption_logprobs(predictor, images, captions, max_length, ablated=True)
    else:
        key, baseline = "logp_other_images", _reference_logprobs(predictor, samples, captions, references,
                                                                  max_length, batch=len(images))
    gain = with_image - baseline
    for sample, g, a, b in zip(samples, gain, with_image, baseline):
        sample["stats"].update({"consistency": round(float(g), 6), "logp_image": round(float(a), 6),
                                key: round(float(b), 6)})
    return gain


def _reference_logprobs(predictor, samples, captions, references, max_length, batch) -> np.ndarray:
    """Per caption, its mean log-prob averaged over its row's reference images; the
    (caption, reference) pairs go through the model `batch` at a time, like the rows themselves."""
    from ..scoring import caption_logprobs

    pairs = [(i, references.features[j]) for i, sample in enumerate(samples)
             for j in references.for_row(sample.get("id"))]
    values = np.concatenate([
        caption_logprobs(predictor, [feature for _, feature in chunk], [captions[i] for i, _ in chunk], max_length,
                         features=True)
        for chunk in (pairs[s:s + batch] for s in range(0, len(pairs), batch))])
    rows = np.array([i for i, _ in pairs])
    return np.bincount(rows, weights=values, minlength=len(samples)) / np.bincount(rows, minlength=len(samples))


@register
class ConsistencyFilter(RangeFilter):
    """Image-text consistency: mean caption log-prob under its image minus under reference images."""

    name = "consistency_filter"
    Params = ConsistencyParams
    uses_model = True
    stat = "consistency"

    def compute_stats_batch(self, samples):
        todo = [s for s in samples if s["caption"] and (self.params.recompute or "consistency" not in s["stats"])]
        if not todo:
            return
        predictor = self.ctx.models.get(self.params.model_dir)
        score_samples(predictor, todo, max_length=self.params.max_length,
                      references=baseline_references(self, predictor))

    def process(self, sample):
        if not sample["caption"]:
            return "empty_caption"
        return super().process(sample)
