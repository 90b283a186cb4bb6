"""Training samples in Qwen-VL's ChatML format, as the contest solution built them.

One sample is

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\nPicture 1: <img>{256 x <imgpad>}</img>\\n{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n{caption}<|im_end|>

and only `{caption}<|im_end|>` is supervised (labels are -100 elsewhere). Everything up to and
including `<|im_start|>assistant\\n` is the *prompt context*; it is identical for every sample, so
it is tokenised once per (tokenizer, template) and prediction reuses the same ids.

Text pieces are encoded the way Qwen-VL's `make_context` does it: role name, "\\n" and content
separately, and the user content split around each image span.

Truncation rule: a sample longer than `max_length` loses answer tokens from the end, and then
carries no closing `<|im_end|>` (teaching the model to stop mid-sentence would be wrong). The
prompt context, including the image span, is never cut: if it does not leave room for at least
one answer token, `ValueError` names the sample.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime import UserError

IGNORE_INDEX = -100  # label value the loss skips

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS_DIR = REPO_ROOT / "config" / "prompts"
DEFAULT_PROMPT_FILE = "style_aware.txt"
DEFAULT_SYSTEM_FILE = "chat_system.txt"


def resolve_prompt_file(path: str | os.PathLike) -> Path:
    """Find a prompt file: as given (absolute or relative to the working directory), then relative
    to the repository root, then inside `config/prompts/`."""
    path = Path(path)
    candidates = [path] if path.is_absolute() else [path, REPO_ROOT / path, PROMPTS_DIR / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise UserError(f"prompt file not found: {path} (tried {tried})")


def read_prompt_file(path: str | os.PathLike) -> str:
    # Trailing newlines are dropped: editors add them silently, and they would change the tokens.
    return resolve_prompt_file(path).read_text(encoding="utf-8").rstrip("\r\n")


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
        """Read the instruction and the system message (default `config/prompts/chat_system.txt`)."""
        system_file = DEFAULT_SYSTEM_FILE if system_file is None else system_file
        return cls(system=read_prompt_file(system_file), prompt=read_prompt_file(prompt_file))


@functools.lru_cache(maxsize=64)
def _prompt_ids(tokenizer, template: PromptTemplate, n_images: int) -> tuple[int, ...]:
    enc, nl = tokenizer.encode, tokenizer.encode("\n")
    ids = [tokenizer.im_start_id] + enc("system") + nl + enc(template.system) + [tokenizer.im_end_id] + nl
    ids += [tokenizer.im_start_id] + enc("user") + nl
    # Upstream's `from_list_format`: "Picture k: <img>..</img>\n" per image, then the instruction.
    # The text between two image spans is encoded as one piece, as upstream's tokenizer does.
    text_before = ""
    for k in range(1, n_images + 1):
        ids += enc(text_before + f"Picture {k}: ") + tokenizer.image_span()
        text_before = "\n"
    ids += enc(text_before + template.prompt) + [tokenizer.im_end_id] + nl
    ids += [tokenizer.im_start_id] + enc("assistant") + nl
    return tuple(ids)


def build_prompt_ids(tokenizer, template: PromptTemplate, n_images: int = 1) -> list[int]:
    """The generation context: everything up to and including `<|im_start|>assistant\\n`."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    return list(_prompt_ids(tokenizer, template, n_images))


def sample_length(prompt_len: int, answer_len: int, max_length: int) -> int:
    """Length of the assembled sample (the truncation rule, without building it)."""
    return min(prompt_len + answer_len + 1, max_length)


def assemble_sample(prompt_ids, answer_ids, im_end_id: int, max_length: int,
                    sample_id: str = "?") -> dict[str, np.ndarray]:
    """prompt + answer + `<|im_end|>` with labels on the answer and `<|im_end|>` only.

    Over-long samples keep the whole prompt and as many answer tokens as fit, without `<|im_end|>`.
    """
    prompt = np.asarray(prompt_ids, dtype=np.int64)
    answer = np.asarray(answer_ids, dtype=np.int64)
    room = max_length - len(prompt)
    if room < 1:
        raise ValueError(
            f"sample {sample_id}: the prompt context alone is {len(prompt)} tokens; max_length "
            f"{max_length} leaves no room for an answer (need at least {len(prompt) + 1})"
        )
    if len(answer) + 1 <= room:
        answer = np.concatenate([answer, np.array([im_end_id], dtype=np.int64)])
    else:
        answer = answer[:room]
    input_ids = np.concatenate([prompt, answer])
    labels = np.concatenate([np.full(len(prompt), IGNORE_INDEX, dtype=np.int64), answer])
    return {"input_ids": input_ids, "labels": labels}


def build_sample(tokenizer, template: PromptTemplate, caption: str, max_length: int,
                 sample_id: str = "?") -> dict[str, np.ndarray]:
    """One training sample: `input_ids` and `labels`, both int64 [T] with T <= max_length."""
    return assemble_sample(_prompt_ids(tokenizer, template, 1), tokenizer.encode(caption),
                           tokenizer.im_end_id, max_length, sample_id)
