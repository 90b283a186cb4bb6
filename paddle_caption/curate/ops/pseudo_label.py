"""Re-caption and pseudo-label: captions written by a model, chosen by the consistency score.

Two sources of images, either or both:
- `unlabeled_tsv`: a TSV of `id \\t base64` rows (a third column is ignored): every usable image gets
  a caption and joins the data as a new row (its record points into that TSV);
- `recaption_below`: rows of the input whose `consistency` (from an earlier consistency_filter) is
  below this bound (fixed, or computed on the data) get a new caption in place of theirs.

Each image gets `num_candidates` captions through the same Predictor as `predict_batch.py` (the n
best beams, or n samples); each candidate is scored by the consistency of `consistency.py`, and the
best one is kept (against the same baseline as the consistency filter's, `baseline` /
`baseline_images`, so the two scores compare). Rows written here carry `synthetic: true` (and the
records.jsonl output says so).
With `min`, a synthetic row whose best consistency is below it is dropped (`synthetic_below_min`);
a bound computed on the data uses every row of the stage that has a consistency.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...data.contest_tsv import RowError, iter_rows
from ...data.distribution import Moments, moments
from ...decoding.derive import check_options, option_field, option_values
from ...runtime import UserError
from ..samples import load_image
from ..thresholds import check_bound, describe_bound, needs_data, resolve_bound
from .base import Op, register
from .consistency import BaselineParams, baseline_references, score_samples


@dataclass
class PseudoLabelParams(BaselineParams):
    model_dir: str = ""
    unlabeled_tsv: str = ""
    recaption_below: object = None
    num_candidates: int = 3
    strategy: str = "beam"  # beam | sample
    # decoding options: GenerationConfig's (help, bounds), with this op's defaults
    temperature: float = option_field("temperature", 0.7)
    top_p: float = option_field("top_p", 0.9)
    max_new_tokens: int = option_field("max_new_tokens", 64)
    min: object = None
    max_length: int = 2048

    def validate(self, where):
        if not self.unlabeled_tsv and self.recaption_below is None:
            raise UserError(f"{where}: give unlabeled_tsv and/or recaption_below")
        if self.unlabeled_tsv and not Path(self.unlabeled_tsv).is_file():
            raise UserError(f"{where}: unlabeled_tsv {self.unlabeled_tsv} not found")
        if self.strategy not in ("beam", "sample") or self.num_candidates < 1:
            raise UserError(f"{where}: strategy is beam or sample, num_candidates >= 1")
        try:
            check_options(self)
        except ValueError as err:
            raise UserError(f"{where}: {err}") from None
        check_bound(self.recaption_below, f"{where}: recaption_below")
        check_bound(self.min, f"{where}: min")
        self.validate_baseline(where)


@register
class PseudoLabel(Op):
    """Caption unlabeled or low-scoring images (n candidates, the most consistent kept)."""

    name = "pseudo_label"
    Params = PseudoLabelParams
    uses_model = True
    stat = "consistency"

    def input_samples(self, samples):
        """The input rows (marked for re-captioning where asked), then the unlabeled images."""
        p = self.params
        if p.recaption_below is not None:
            self.recaption_cut = self._recaption_cut(p.recaption_below)
        for sample in samples:
            value = sample["stats"].get("consistency")
            if p.recaption_below is not None and (value is None or value < self.recaption_cut):
                sample["stats"]["recaption"] = True
            yield sample
        if p.unlabeled_tsv:
            yield from self._unlabeled()

    def _recaption_cut(self, bound) -> float:
        if not needs_data(bound):
            return float(bound)
        from ..samples import iter_samples

        source = self.ctx.stage_input
        values = lambda: (s["stats"]["consistency"] for s in iter_samples(source) if "consistency" in s["stats"])  # noqa: E731
        data = moments(values())
        if data.n == 0:
            raise UserError("pseudo_label: recaption_below needs a consistency_filter before it")
        return resolve_bound(bound, values, data)

    def _unlabeled(self):
        path = str(Path(self.params.unlabeled_tsv).resolve())
        for _, line, row in iter_rows(path, test=True, what="unlabeled TSV"):
            sample = {"id": row.row_id if isinstance(row, RowError) else row.id, "caption": "", "tsv": path,
                      "offset": line.offset, "length": line.length, "width": 0, "height": 0,
                      "stats": {"unlabeled": True}, "synthetic": True, "copy": 0}
            if isinstance(row, RowError):
                sample["stats"]["unusable"] = row.reason
            yield sample

    def compute_stats_batch(self, samples):
        from ...data.images import ImageRejected
        from ..scoring import candidates

        todo, images = [], []
        for sample in samples:
            if not (sample["stats"].get("recaption") or sample["stats"].get("unlabeled")):
                continue
            if sample["stats"].get("unusable") or "candidates" in sample["stats"]:
                continue
            try:
                img = load_image(sample)
            except (ImageRejected, ValueError, OSError) as err:
                sample["stats"]["unusable"] = getattr(err, "reason", "undecodable_image")
                continue
            sample["width"], sample["height"] = img.size
            todo.append(sample)
            images.append(img)
        if not todo:
            return
        p = self.params
        predictor = self.ctx.models.get(p.model_dir)
        images = [predictor.preprocess(img) for img in images]
        texts = candidates(predictor, images, p.num_candidates, p.strategy, **option_values(p), seed=self.ctx.seed)
        flat_samples = [{"id": s["id"], "stats": {}} for s in todo for _ in range(p.num_candidates)]
        flat_images = [img for img in images for _ in range(p.num_candidates)]
        flat_texts = [t or " " for ts in texts for t in ts]
        gains = score_samples(predictor, flat_samples, flat_texts, flat_images, p.max_length,
                              references=baseline_references(self, predictor))
        for i, sample in enumerate(todo):
            block = slice(i * p.num_candidates, (i + 1) * p.num_candidates)
            best = max(range(p.num_candidates), key=lambda j: gains[block][j])
            chosen = flat_samples[block][best]
            if sample["caption"]:
                sample["stats"]["original_caption"] = sample["caption"]
            sample["caption"] = texts[i][best]
            sample["synthetic"] = True
            sample["stats"].update(chosen["stats"])
            sample["stats"]["candidates"] = p.num_candidates

    def prepare(self, read):
        p = self.params
        values = lambda: (s["stats"]["consistency"] for s in read() if "consistency" in s["stats"])  # noqa: E731
        self.low = resolve_bound(p.min, values, moments(values()) if needs_data(p.min) else Moments())
        self.info = {"min": describe_bound(p.min), "min_value": self.low,
                     "recaption_below": describe_bound(p.recaption_below),
                     "recaption_below_value": getattr(self, "recaption_cut", None)}

    def process(self, sample):
        stats = sample["stats"]
        if stats.get("unusable"):
            return f"unusable_{stats['unusable']}"
        if not sample["caption"].strip():
            return "empty_caption"
        if sample.get("synthetic") and "candidates" in stats and self.low is not None and stats["consistency"] < self.low:
            return "synthetic_below_min"
        return None
