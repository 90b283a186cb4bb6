"""Command-line flags and request fields derived from the decoding options' dataclass.

`GenerationConfig` declares each option once (type, default, bounds, help: `config.option`); this
module turns its public fields into argparse flags (`add_flags`, read back by `config_from_args`),
into pydantic fields (`options_model`) and into fields of other configs (`option_field`), the way
`typed_config.py` turns JSON into a dataclass.
So `predict_batch.py` and both service endpoints offer exactly the dataclass's options, with its
bounds, and a new option appears everywhere at once (tested with a dataclass that adds one); the
curation ops that decode (`pseudo_label`) declare theirs with `option_field`. Every function
takes the dataclass as an argument (default `GenerationConfig`).

Paddle-free; pydantic is imported only by `options_model` (the service's dependency).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import ClassVar, Optional

from ..typed_config import base_type, field_types
from .config import HELP, MAX, MIN, MIN_EXCLUSIVE, PUBLIC, GenerationConfig


def public_fields(cls=GenerationConfig) -> list[dataclasses.Field]:
    """The options a user sets, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get(PUBLIC)]


def _bounds_text(f: dataclasses.Field) -> str:
    parts = []
    if f.metadata.get(MIN) is not None:
        parts.append(f"{'>' if f.metadata.get(MIN_EXCLUSIVE) else '>='} {f.metadata[MIN]}")
    if f.metadata.get(MAX) is not None:
        parts.append(f"<= {f.metadata[MAX]}")
    return ", ".join(parts)


def help_text(f: dataclasses.Field) -> str:
    """The field's help with its bounds and default, e.g. "most new tokens per caption (>= 1; default 128)"."""
    bounds = _bounds_text(f)
    return f"{f.metadata.get(HELP, '')} ({bounds + '; ' if bounds else ''}default {f.default})"


def add_flags(parser, cls=GenerationConfig) -> None:
    """One `--name` flag per public option of `cls` (a bool is a switch: `--do_sample`)."""
    hints = field_types(cls)
    for f in public_fields(cls):
        kind = base_type(hints[f.name])
        if kind is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(f"--{f.name}", action=action, default=f.default, help=help_text(f))
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text(f))


def config_from_args(args, cls=GenerationConfig, **fixed):
    """The `cls` the parsed flags of `add_flags` describe (`fixed` sets non-public fields); raises
    ValueError naming a bad option (a config checks itself when made)."""
    return cls(**{f.name: getattr(args, f.name) for f in public_fields(cls)}, **fixed)


def option_field(name: str, default=dataclasses.MISSING, cls=GenerationConfig):
    """A field of another dataclass (e.g. a curation op's parameters) that *is* the decoding option
    `name`: its help and bounds, with that dataclass's own default. `check_options` checks it."""
    declared = {f.name: f for f in dataclasses.fields(cls)}[name]
    return dataclasses.field(default=declared.default if default is dataclasses.MISSING else default,
                             metadata=declared.metadata)


def option_values(obj, cls=GenerationConfig) -> dict:
    """{option: value} of the fields of dataclass `obj` that are options of `cls` (by name)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name in names}


def check_options(obj, cls=GenerationConfig) -> None:
    """Check `obj`'s decoding options as `cls` does (ValueError naming the option)."""
    cls(**option_values(obj, cls))


def options_model(name: str, cls=GenerationConfig, *, base=None, exclude=(), optional=()):
    """A pydantic model with one field per public option of `cls` (its type, default, bounds as
    ge/gt/le and help as description), minus `exclude` (options an API edge names its own way);
    fields in `optional` accept null and default to it (the edge then decides). The model class
    carries `decoding_class` = `cls` and `decoding_values()`: the options set, by field name."""
    from pydantic import BaseModel, Field, create_model

    hints, fields = field_types(cls), {}
    for f in public_fields(cls):
        if f.name in exclude:
            continue
        kind = base_type(hints[f.name])
        bounds = {}
        if f.metadata.get(MIN) is not None:
            bounds["gt" if f.metadata.get(MIN_EXCLUSIVE) else "ge"] = f.metadata[MIN]
        if f.metadata.get(MAX) is not None:
            bounds["le"] = f.metadata[MAX]
        if f.name in optional:
            fields[f.name] = (Optional[kind], Field(None, description=help_text(f), **bounds))
        else:
            fields[f.name] = (kind, Field(f.default, description=help_text(f), **bounds))
    model = _with_values(base or BaseModel, cls, list(fields))
    return create_model(name, __base__=model, **fields)


def _with_values(base, cls, names: list[str]):
    """`base` plus what every derived options model has: its dataclass and the derived values."""

    class DecodingFields(base):
        decoding_class: ClassVar[type] = cls

        def decoding_values(self) -> dict:
            """{option: value} of the derived fields that are set (not null)."""
            return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    return DecodingFields
