"""The curation operations; importing this package registers every one of them (`base.OPS`)."""
from . import cleaning, cluster, consistency, dedup, filters, pseudo_label, repeat
from .base import OPS, Op, OpContext, build_op

__all__ = ["OPS", "Op", "OpContext", "build_op", "cleaning", "cluster", "consistency", "dedup", "filters", "pseudo_label", "repeat"]
