"""Training samples in Qwen-VL's ChatML format, as the contest solution built them.

One sample is

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\nPicture 1: <img>{256 x <imgpad>}</img>\\n{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n{caption}<|im_end|>

and only `{caption}<|im_end|>` is supervised (labels are -100 elsewhere). Everything up to and
including `<|im_start|>assistant\\n` is the *prompt context*; it is identical for every sample, so
it is tokenised once per (tokenizer, template) and prediction reuses the same ids.

The system message and instruction come from a `PromptTemplate` (`prompts.py`). Text pieces are
encoded the way Qwen-VL's `make_context` does it: role name, "\\n" and content
separately, and the user content split around each image span.

Truncation rule: a sample longer than `max_length` loses answer tokens from the end, and then
carries no closing `<|im_end|>` (teaching the model to stop mid-sentence would be wrong). The
prompt context, including the image span, is never cut: if it does not leave room for at least
one answer token, `ValueError` names the sample.
"""
from __future__ import annotations

import functools

import numpy as np

from ..model.config import IGNORE_INDEX
from .prompts import PromptTemplate


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
