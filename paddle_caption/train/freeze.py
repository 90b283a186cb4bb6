"""Choose which parameters train, by name patterns, and say so in a table.

Patterns are shell globs over full parameter names (`fnmatch`), with one extension: `{a..b}`
expands to every integer in the range, e.g. `transformer.llm.h.{16..31}.*`. Order:

1. a parameter is trainable if it matches at least one `trainable` glob;
2. then any parameter matching a `frozen` glob is frozen again;
3. parameters the architecture keeps fixed (stop_gradient at construction, e.g. the resampler's
   sin-cos table) stay frozen.

Every expanded glob must match at least one parameter — so a layer range beyond the model's depth
(`h.{16..31}` on an 8-layer model) is refused, not silently ignored — and the result must be
neither empty nor, in partial mode, everything.
"""
from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict

from ..runtime import UserError

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_glob(pattern: str) -> list[str]:
    match = _RANGE.search(pattern)
    if not match:
        return [pattern]
    lo, hi = int(match.group(1)), int(match.group(2))
    if lo > hi:
        raise UserError(f"pattern {pattern!r}: empty range {{{lo}..{hi}}}")
    out = []
    for i in range(lo, hi + 1):
        out.extend(expand_glob(pattern[:match.start()] + str(i) + pattern[match.end():]))
    return out


def select_trainable(names: list[str], trainable: list[str], frozen: list[str]) -> set[str]:
    """Apply the documented order; raise UserError naming any glob that matches nothing."""
    chosen: set[str] = set()
    for group, patterns in (("trainable", trainable), ("frozen", frozen)):
        for pattern in patterns:
            hits = match_pattern(pattern, names, group)
            if group == "trainable":
                chosen.update(hits)
            else:
                chosen.difference_update(hits)
    return chosen


def match_pattern(pattern: str, names: list[str], group: str, noun: str = "parameter") -> list[str]:
    """Names matching `pattern` (ranges expanded); UserError if any expanded glob matches none."""
    hits = []
    for glob in expand_glob(pattern):
        found = fnmatch.filter(names, glob)
        if not found:
            which = f"pattern {pattern!r}" if glob == pattern else f"pattern {pattern!r}: {glob!r}"
            raise UserError(f"{group} {which} matches no {noun} (e.g. a layer range beyond the "
                            f"model's depth); first names: {names[:3]}")
        hits.extend(found)
    return hits


def apply_freezing(model, trainable: list[str], frozen: list[str], mode: str) -> set[str]:
    """Set stop_gradient on every parameter; returns the names that train."""
    fixed = {name for name, p in model.named_parameters() if p.stop_gradient}
    names = [name for name, _ in model.named_parameters()]
    chosen = select_trainable(names, trainable, frozen) - fixed
    if not chosen:
        raise UserError("the trainable/frozen patterns leave no parameter to train")
    if mode == "partial" and chosen == set(names) - fixed:
        raise UserError("finetune_mode 'partial' but the patterns make every parameter trainable "
                        "(use finetune_mode 'full' if that is intended)")
    for name, param in model.named_parameters():
        param.stop_gradient = name not in chosen
    return chosen


def group_name(name: str) -> str:
    """Group parameter names for the summary table: `transformer.llm.h.17.attn...` -> `transformer.llm.h.17`."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2]) if len(parts) > 2 else name


def trainable_table(model) -> str:
    """A table of parameter groups: trainable / total counts, runs of identical layers folded."""
    import numpy as np

    groups: "OrderedDict[str, list[int]]" = OrderedDict()
    for name, param in model.named_parameters():
        count = int(np.prod(param.shape))
        entry = groups.setdefault(group_name(name), [0, 0])
        entry[1] += count
        if not param.stop_gradient:
            entry[0] += count
    rows, previous = [], None
    for name, (train, total) in groups.items():
        state = "train" if train == total else ("frozen" if train == 0 else "partly")
        prefix = re.sub(r"\.\d+$", "", name)
        key = (prefix, state, train, total)
        if previous and previous[0] == key:  # fold consecutive identical layers: h.16-31
            previous[2] = name.rsplit(".", 1)[-1]
            continue
        previous = [key, name, None]
        rows.append(previous)
    lines = [f"{'parameter group':<40} {'state':>7} {'trainable':>13} {'total':>13}"]
    for (prefix, state, train, total), first, last in rows:
        label = first if last is None else f"{first}-{last}  (each)"
        lines.append(f"{label:<40} {state:>7} {train:>13,} {total:>13,}")
    n_train = sum(v[0] for v in groups.values())
    n_total = sum(v[1] for v in groups.values())
    lines.append(f"{'total':<40} {'':>7} {n_train:>13,} {n_total:>13,}  ({100 * n_train / n_total:.2f}% trainable)")
    return "\n".join(lines)


def apply_lr_scale(model, rules: list) -> dict[str, float]:
    """Per-parameter learning-rate multipliers ([[glob, factor], ...], last match wins), set on
    Paddle's `optimize_attr["learning_rate"]`, which every Paddle optimizer multiplies in.
    Returns {name: factor} for the parameters changed; a glob matching no trainable one is an error."""
    trainable = [(name, p) for name, p in model.named_parameters() if not p.stop_gradient]
    names = [name for name, _ in trainable]
    factors: dict[str, float] = {}
    for pattern, factor in rules:
        factors.update(dict.fromkeys(match_pattern(pattern, names, "lr_scale", "trainable parameter"),
                                     float(factor)))
    for name, param in trainable:
        if name in factors:
            param.optimize_attr["learning_rate"] = factors[name]
    return factors
