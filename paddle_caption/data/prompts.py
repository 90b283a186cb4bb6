"""The system message and instruction that precede every caption, and where they come from.

Training reads them from files (default: the packaged `config/prompts/chat_system.txt` and
`style_aware.txt`) and saves them with every checkpoint as `prompt.json`; a merged model directory
carries that file, so prediction, the service and evaluation prompt a model exactly as it was
trained (`load_template`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import resources
from ..files import read_json_object, write_json
from ..runtime import UserError

DEFAULT_PROMPT_FILE = "style_aware.txt"
DEFAULT_SYSTEM_FILE = "chat_system.txt"
PROMPT_JSON = "prompt.json"


def read_prompt_file(path: str | os.PathLike) -> str:
    """A prompt file's text: as given, else among the packaged prompts (see `resources`)."""
    # Trailing newlines are dropped: editors add them silently, and they would change the tokens.
    return resources.find_file(path, "prompt file").read_text(encoding="utf-8").rstrip("\r\n")


@dataclass(frozen=True)
class PromptTemplate:
    """The system message and the user instruction that precede every caption.

    Frozen (hashable) so that the tokenised prompt context can be cached per template.
    """

    system: str
    prompt: str

    @classmethod
    def from_files(cls, prompt_file: str | os.PathLike = DEFAULT_PROMPT_FILE,
                   system_file: str | os.PathLike | None = None) -> "PromptTemplate":
        """Read the instruction and the system message (default: the packaged chat_system.txt)."""
        system_file = DEFAULT_SYSTEM_FILE if system_file is None else system_file
        return cls(system=read_prompt_file(system_file), prompt=read_prompt_file(prompt_file))

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / PROMPT_JSON
        write_json(path, {"system": self.system, "prompt": self.prompt})
        return path


def load_template(model_dir: str | os.PathLike | None = None, prompt_file: str | None = None,
                  system_file: str | None = None) -> PromptTemplate:
    """The model directory's training prompt (prompt.json), else the packaged default; either part
    can be replaced by a file."""
    base = None
    path = Path(model_dir) / PROMPT_JSON if model_dir is not None else None
    if path is not None and path.is_file():
        data = read_json_object(path, "prompt file")
        if not (isinstance(data.get("system"), str) and isinstance(data.get("prompt"), str)):
            raise UserError(f'{path}: expected {{"system": str, "prompt": str}}')
        base = PromptTemplate(system=data["system"], prompt=data["prompt"])
    if base is None:
        base = PromptTemplate.from_files()
    return PromptTemplate(system=read_prompt_file(system_file) if system_file else base.system,
                          prompt=read_prompt_file(prompt_file) if prompt_file else base.prompt)
