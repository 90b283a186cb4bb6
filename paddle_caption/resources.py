"""The kit's own files (prompts, model architectures, run configs), found the same way installed or not.

They live in the package (`paddle_caption/config/`, package data; the repository's `config/` is a
link to it), so an installed kit has them too. A path a user gives is looked up as given first
(absolute, or relative to the working directory); only a path that does not exist there is looked up
among the packaged files, with or without its leading `config/`: `config/demo.json`,
`model/tiny.json` and `style_aware.txt` (a prompt) all name packaged files.
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

PACKAGE_CONFIG_DIR = "config"
PROMPTS_SUBDIR = "prompts"


def packaged_config_dir() -> Path:
    """The installed `paddle_caption/config` directory (a real directory: the package is not zipped)."""
    return Path(str(importlib.resources.files("paddle_caption") / PACKAGE_CONFIG_DIR))


def candidates(path: str | os.PathLike) -> list[Path]:
    """Where `path` is looked for, in order."""
    path = Path(path)
    if path.is_absolute():
        return [path]
    packaged = packaged_config_dir()
    parts = path.parts
    inner = Path(*parts[1:]) if parts and parts[0] == PACKAGE_CONFIG_DIR and len(parts) > 1 else path
    found = [path, packaged / inner]
    if len(inner.parts) == 1:  # a bare file name may be a prompt
        found.append(packaged / PROMPTS_SUBDIR / inner)
    return found


def find_file(path: str | os.PathLike, what: str = "file") -> Path:
    """The first existing file among `candidates(path)`, or a UserError listing where it looked."""
    from .runtime import UserError

    tried = candidates(path)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise UserError(f"{what} not found: {path} (tried {', '.join(str(c) for c in tried)})")


def resolve(path: str | os.PathLike | None) -> Path | None:
    """Like `find_file`, but a path found nowhere is returned as given (the caller reports it)."""
    if not path:
        return None
    for candidate in candidates(path):
        if candidate.exists():
            return candidate
    return Path(path)
