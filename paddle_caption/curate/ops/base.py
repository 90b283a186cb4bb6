"""What an operation is, and the registry recipes name operations from.

The data-juicer split (its `Filter.compute_stats_single` writes into the sample's `__dj__stats__`,
`process_single` decides from them; a `Deduplicator` computes a hash, then keeps first occurrences):
`compute_stats(sample)` writes the operation's statistic into `sample["stats"]`; `process(sample)`
decides from it alone (a drop reason, or None to keep). Between
the two, `prepare(read)` may compute what the decision needs from the whole stage (a percentile, a
k-means model), reading the stats file again as often as it needs (`read()` streams it anew).
Selections that are not one row at a time (deduplication keeps first occurrences, clustering keeps
quotas, repeating writes copies) override `select`, which yields `(sample, reason)` pairs; a
sample yielded more than once is a copy.

Model operations (`uses_model = True`) compute their statistics in batches (`compute_stats_batch`),
split across the processes of a `paddle.distributed.launch` run (`paddle_caption.shards`).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator

from ...data.distribution import Moments, moments
from ...runtime import UserError
from ...typed_config import from_mapping
from ..thresholds import check_bound, describe_bound, needs_data, resolve_bound

OPS: dict[str, type["Op"]] = {}


def register(cls):
    OPS[cls.name] = cls
    return cls


@dataclass
class OpContext:
    """What an operation may use besides its parameters."""

    work_dir: Path  # the stage's directory (scratch files)
    stage_input: Path | None = None  # the samples file the stage reads
    rank: int = 0
    world_size: int = 1
    batch_size: int = 16
    seed: int = 0
    progress: bool = True
    models: object = None  # scoring.ModelCache: one loaded model per directory, shared by the ops


class Op:
    name: ClassVar[str] = ""
    Params: ClassVar[type] = object
    uses_model: ClassVar[bool] = False
    # Statistics worth splitting across the processes of a launch like a model op's (a decode and a
    # hash per row); the decision stays on rank 0.
    shardable: ClassVar[bool] = False
    stat: ClassVar[str | None] = None  # the numeric statistic decisions are made on (ledger score, plots)
    transient: ClassVar[tuple] = ()  # bulky statistics (hashes, features) dropped from the stage's output

    def __init__(self, params, ctx: OpContext):
        self.params, self.ctx = params, ctx
        self.info: dict = {}  # what `prepare` decided (resolved bounds, ...), for the report

    def plan(self, ops: list["Op"]) -> None:
        """Called once with every op of the recipe, before anything runs (an op may compute, in its
        statistics pass, what later ops will read: the dedup ops decode each image once)."""

    # ---- statistics ----------------------------------------------------------------------------
    def input_samples(self, samples: Iterator[dict]) -> Iterator[dict]:
        """The samples the statistics pass sees: the stage's input (an op may add some)."""
        return samples

    def compute_stats(self, sample: dict) -> None:
        """Write this op's statistics into sample["stats"] (nothing if already there)."""

    def compute_stats_batch(self, samples: list[dict]) -> None:
        for sample in samples:
            self.compute_stats(sample)

    # ---- decisions -----------------------------------------------------------------------------
    def prepare(self, read: Callable[[], Iterable[dict]]) -> None:
        """Compute what `process` needs from the whole stage (default: nothing)."""

    def process(self, sample: dict) -> str | None:
        return None

    def select(self, read: Callable[[], Iterable[dict]]) -> Iterator[tuple[dict, str | None]]:
        self.prepare(read)
        for sample in read():
            yield sample, self.process(sample)

    def score(self, sample: dict):
        """The number the ledger records with a drop."""
        return sample["stats"].get(self.stat) if self.stat else None


def build_op(entry, ctx: OpContext, where: str) -> Op:
    """An op from one recipe entry `{op_name: {params}}`."""
    if not (isinstance(entry, dict) and len(entry) == 1):
        raise UserError(f"{where}: each process entry is {{op_name: {{params}}}}, not {entry!r}")
    (name, params), = entry.items()
    if name not in OPS:
        raise UserError(f"{where}: unknown op {name!r} (known: {', '.join(sorted(OPS))})")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise UserError(f"{where}: parameters of {name} must be an object, not {params!r}")
    cls = OPS[name]
    parsed = from_mapping(cls.Params, params, f"{where} ({name})")
    validate = getattr(parsed, "validate", None)
    if validate:
        validate(f"{where} ({name})")
    return cls(parsed, ctx)


# ---------------------------------------------------------------------------------- range filters
@dataclass
class RangeParams:
    """Keep rows whose statistic lies in [min, max]; each bound fixed or computed on the data."""

    min: object = None
    max: object = None

    def validate(self, where: str) -> None:
        check_bound(self.min, f"{where}: min")
        check_bound(self.max, f"{where}: max")
        if self.min is None and self.max is None:
            raise UserError(f"{where}: give min and/or max")


class RangeFilter(Op):
    """A filter on numeric statistics, each with [min, max] bounds (see thresholds.py).

    `ranges()` lists (statistic, min bound, max bound); a row is dropped by the first statistic
    outside its bounds, with reason `<stat>_below_min` or `<stat>_above_max`.
    """

    def ranges(self) -> list[tuple[str, object, object]]:
        return [(self.stat, self.params.min, self.params.max)]

    def prepare(self, read) -> None:
        self.bounds = []
        self.info = {"bounds": {}}
        ranges = [(stat, low, high) for stat, low, high in self.ranges() if low is not None or high is not None]
        columns = self._columns(read, [stat for stat, low, high in ranges if needs_data(low) or needs_data(high)])
        for stat, low, high in ranges:
            values = lambda stat=stat: iter(columns[stat])  # noqa: E731
            data = moments(values()) if needs_data(low) or needs_data(high) else Moments()
            lo, hi = resolve_bound(low, values, data), resolve_bound(high, values, data)
            self.bounds.append((stat, lo, hi))
            entry = {"min": describe_bound(low), "max": describe_bound(high), "min_value": lo, "max_value": hi}
            if data.n:
                entry.update(mean=data.mean, std=data.std, n=data.n)
            self.info["bounds"][stat] = entry

    @staticmethod
    def _columns(read, stats: list[str]) -> dict[str, list]:
        """The values of `stats` over the stage, read in one pass (8 bytes a row and statistic, as the
        report's arrays): a bound computed on the data reads them two or three times (moments, then the
        streaming quantile's passes), and re-parsing the stage's JSON lines for each was most of a
        filter's decision time."""
        if not stats:
            return {}
        columns = {stat: array("d") for stat in stats}
        for sample in read():
            for stat, column in columns.items():
                value = sample["stats"].get(stat)
                if value is not None:
                    column.append(value)
        return columns

    def process(self, sample: dict) -> str | None:
        for stat, low, high in self.bounds:
            value = sample["stats"].get(stat)
            if value is None:
                continue  # not applicable (a statistic the row has no input for)
            if low is not None and value < low:
                self.failed = stat
                return f"{stat}_below_min"
            if high is not None and value > high:
                self.failed = stat
                return f"{stat}_above_max"
        return None

    def score(self, sample: dict):
        return sample["stats"].get(getattr(self, "failed", None) or self.stat)
