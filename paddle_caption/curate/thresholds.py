"""Bounds for a statistic, fixed or computed on the data itself.

A bound in a recipe is one of
- a number: fixed (`"min": 12`);
- `{"percentile": q}`: the nearest-rank q-th percentile of the statistic over the op's input;
- `{"mean_std": k}`: mean + k * std (population std; k may be negative: `{"mean_std": -1}`);
- `"mean"`: the mean (`"min": "mean"` drops every row below the mean, the Better Synth cut).

Computed bounds use the statistics of `paddle_caption.data.distribution` (running moments, exact
streaming quantiles) on the values `read()` yields; the range filters read those once from the stage's
stats file into a column of 8 bytes a row (`RangeFilter._columns`) rather than parse it once per pass.
"""
from __future__ import annotations

from typing import Callable, Iterable

from ..data.distribution import Moments, exact_quantiles
from ..runtime import UserError


BOUND_HELP = 'a number, {"percentile": q}, {"mean_std": k} or "mean"'


def check_bound(value, where: str) -> None:
    """A recipe bound's form (see the module docstring), or a UserError naming `where`."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)) or value == "mean":
        return
    if isinstance(value, dict) and len(value) == 1:
        (kind, arg), = value.items()
        if kind in ("percentile", "mean_std") and isinstance(arg, (int, float)) and not isinstance(arg, bool):
            if kind == "percentile" and not 0 <= arg <= 100:
                raise UserError(f"{where}: percentile must be in [0, 100], got {arg}")
            return
    raise UserError(f"{where}: a bound is {BOUND_HELP}, not {value!r}")


def needs_data(value) -> bool:
    return value is not None and not isinstance(value, (int, float))


def resolve_bound(value, read: Callable[[], Iterable[float]], stats: Moments) -> float | None:
    """A recipe bound as a number, computed on the values `read()` yields where it asks to be."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    if stats.n == 0:
        return None
    if value == "mean":
        return stats.mean
    (kind, arg), = value.items()
    if kind == "mean_std":
        return stats.mean + arg * stats.std
    return float(exact_quantiles(read, [arg], stats)[0])


def describe_bound(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    if value == "mean":
        return "mean"
    (kind, arg), = value.items()
    return f"p{arg:g}" if kind == "percentile" else f"mean{arg:+g}std"
