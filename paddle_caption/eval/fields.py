"""Field accuracy for the synthetic ad world: did the caption get the style, background and objects right?

CIDEr-D says how close a caption is to its reference; on synthetic data we can also say *what* is
wrong, because every caption follows one grammar (`paddle_caption.data.synthetic.parse_caption`).
"""
from __future__ import annotations

from typing import Mapping

from ..data.synthetic import parse_caption

FIELD_KEYS = ("background", "style", "object_count", "colour", "shape", "exact", "parse_rate")


def _fraction(hits: int, total: int) -> float | None:
    # None (JSON null) rather than a made-up value when nothing could be scored, e.g. colour
    # accuracy on a set of 黑白简笔风格 references, which name no colours.
    return hits / total if total else None


def field_accuracy(predictions: Mapping[str, str], references: Mapping[str, str]) -> dict:
    """Per-field accuracy of predicted captions against one reference caption per id.

    Returns fractions in [0, 1] (None when a field has nothing to score):
      background, style, object_count -- over ids whose reference parses; a prediction that does not
          parse counts as wrong;
      colour -- per object, positionally (prediction object i vs reference object i; one object is
          the centre one, two are [left, right]), over reference objects that have a colour; a
          missing prediction object, or one without a colour, counts as wrong;
      shape -- per object, positionally, over all reference objects, same rules;
      exact -- the whole caption string equals the reference (surrounding whitespace ignored), over
          all ids;
      parse_rate -- fraction of predictions that follow the synthetic grammar, over all ids;
    plus n (ids scored) and n_parsed_refs (ids whose reference parses).
    Raises ValueError if an id has no prediction or no reference parses at all (not synthetic data).
    """
    missing = [key for key in references if key not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} ids have no prediction, first {missing[:3]}")
    if not references:
        raise ValueError("no references to score")

    counts = dict.fromkeys(("parsed_refs", "background", "style", "object_count", "colour",
                            "colour_total", "shape", "shape_total", "exact", "parsed_preds"), 0)
    for key, ref_text in references.items():
        pred_text = predictions[key].strip()
        pred = parse_caption(pred_text)
        counts["parsed_preds"] += pred is not None
        counts["exact"] += pred_text == ref_text.strip()
        ref = parse_caption(ref_text.strip())
        if ref is None:
            continue
        counts["parsed_refs"] += 1
        pred_objects = pred.objects if pred is not None else []
        counts["background"] += pred is not None and pred.background == ref.background
        counts["style"] += pred is not None and pred.style == ref.style
        counts["object_count"] += pred is not None and len(pred_objects) == len(ref.objects)
        for i, (colour, shape) in enumerate(ref.objects):
            guess = pred_objects[i] if i < len(pred_objects) else (None, None)
            counts["shape_total"] += 1
            counts["shape"] += guess[1] == shape
            if colour is not None:
                counts["colour_total"] += 1
                counts["colour"] += guess[0] == colour

    if counts["parsed_refs"] == 0:
        raise ValueError("no reference caption follows the synthetic-ad grammar; field accuracy "
                         "only applies to synthetic data")
    n_refs = counts["parsed_refs"]
    return {
        "background": _fraction(counts["background"], n_refs),
        "style": _fraction(counts["style"], n_refs),
        "object_count": _fraction(counts["object_count"], n_refs),
        "colour": _fraction(counts["colour"], counts["colour_total"]),
        "shape": _fraction(counts["shape"], counts["shape_total"]),
        "exact": _fraction(counts["exact"], len(references)),
        "parse_rate": _fraction(counts["parsed_preds"], len(references)),
        "n": len(references),
        "n_parsed_refs": n_refs,
    }


def field_scores(predictions: Mapping[str, str], references: Mapping[str, list[str]]) -> dict:
    """`field_accuracy` as flat `acc_<field>` scores against each id's first reference, for logs;
    nothing where the references do not follow the synthetic grammar."""
    try:
        fields = field_accuracy(predictions, {key: refs[0] for key, refs in references.items()})
    except ValueError:
        return {}
    return {f"acc_{key}": value for key, value in fields.items() if isinstance(value, float)}
