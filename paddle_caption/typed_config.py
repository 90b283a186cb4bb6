"""Dataclass configs read from JSON and `--key value` overrides, with types checked.

Every run config of the kit (training, cleaning, curation recipes, ...) is a dataclass; this module
turns a JSON object into one. An unknown key or a value of the wrong type is a one-line UserError
naming the source and the key, raised before anything heavy is imported. Keys starting with "_"
(e.g. "_comment") document a file and are skipped.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing

from .runtime import UserError


def field_types(cls) -> dict:
    """{field name: resolved type hint} of a dataclass (string annotations resolved)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def unknown_key(cls, key: str) -> str:
    """The message for a key `cls` does not have; a dataclass may list renamed keys in a class
    attribute `RENAMED_KEYS` = {old name: what replaced it}, so an old config gets told the new one."""
    renamed = getattr(cls, "RENAMED_KEYS", {})
    if key in renamed:
        return f"unknown key {key!r}: it was renamed to {renamed[key]}"
    return f"unknown key {key!r} (known: {', '.join(field_types(cls))})"


def from_mapping(cls, data: dict, source: str = "config", base=None, ignore=frozenset()):
    """A `cls` instance from `data`: fields from `base` (or the defaults) updated by `data`.

    A field whose type is a dataclass takes a JSON object, read the same way (`source: key`). Keys in
    `ignore` are dropped: a format written by other tools (an upstream model config) may carry keys
    that change nothing here, while any other unknown key stays an error.
    """
    hints = field_types(cls)
    values = dataclasses.asdict(base) if base is not None else {}
    for key, value in data.items():
        if key.startswith("_") or (key in ignore and key not in hints):
            continue
        if key not in hints:
            raise UserError(f"{source}: {unknown_key(cls, key)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            values[key] = from_mapping(hints[key], value, f"{source}: {key}", ignore=ignore)
        else:
            values[key] = check_type(key, value, hints[key], source)
    return cls(**values)


def parse_overrides(args: list[str], cls) -> dict:
    """`--key value` pairs for the dataclass `cls` -> {key: typed value}. Lists take a JSON array;
    bools true/false; a bare `--flag` of a bool field means true."""
    hints = field_types(cls)
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"override {arg!r}: expected --key value")
        key, _, inline = arg[2:].partition("=")
        if key not in hints:
            raise UserError(f"override --{key}: {unknown_key(cls, key)}")
        if inline:
            raw = inline
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 2
        elif base_type(hints[key]) is bool:
            raw = "true"
            i += 1
        else:
            raise UserError(f"override --{key}: missing value")
        out[key] = parse_value(key, raw, hints[key])
    return out


def base_type(hint):
    """`int | None` -> int, `list[str]` -> list, `str` -> str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        return base_type(args[0])
    return typing.get_origin(hint) or hint


def is_optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def parse_value(key: str, raw: str, hint):
    """A command-line string as the field's type."""
    base = base_type(hint)
    try:
        if raw.lower() in ("none", "null") and is_optional(hint):
            return None
        if base is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if base in (int, float):
            return base(raw)
        if base in (list, dict):
            value = json.loads(raw)
            if not isinstance(value, base):
                raise ValueError
            return value
        return raw
    except ValueError:
        raise UserError(f"override --{key}: {raw!r} is not a valid {base.__name__}") from None


def check_type(key: str, value, hint, source: str):
    """`value` if it has the field's type (an int is accepted for a float), else a UserError."""
    base = base_type(hint)
    if value is None and is_optional(hint):
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise UserError(f"{source}: key {key!r} must be true/false, not {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{source}: key {key!r} must be an integer, not {value!r}")
    if not isinstance(value, base):
        raise UserError(f"{source}: key {key!r} must be {base.__name__}, not {type(value).__name__} {value!r}")
    return value
