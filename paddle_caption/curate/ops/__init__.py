"""The curation operations; importing this package registers every one of them (`base.OPS`)."""
from . import cluster, consistency, dedup, filters, pseudo_label, repeat  # noqa: F401  (registration)
from .base import OPS, Op, OpContext, build_op  # noqa: F401
