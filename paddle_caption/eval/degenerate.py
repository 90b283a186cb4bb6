"""Degenerate captions: the failure SCST is known for, measured the same way in training and tests.

Optimising CIDEr-D rewards high-idf words; a policy can learn to end a caption with a dangling
one ("…的") or to repeat a phrase that scores. A caption is degenerate when it

* is unfinished: it does not end with sentence-final punctuation, or its last word is one that
  cannot end a Chinese sentence (的 / 和 / 与 / 是 / 在 / 一个 …), or decoding ran out of tokens;
* repeats itself: a word n-gram of `REPEAT_N` words occurs twice, a phrase of 1-3 words follows
  itself ("红色的红色的"), or a clause (text between punctuation) occurs twice.

Why n = 6: the synthetic world's captions of two equal objects legitimately repeat a 5-gram
("左边是一个橙色的五角星，右边是一个橙色的五角星": "是 一个 橙色 的 五角星"); no reference caption
of the demo's training split (3686 captions) is degenerate by this definition (measured; the
tests check such captions and real-style ad captions).
"""
from __future__ import annotations

import re

from .caption_scores import tokenize

REPEAT_N = 6
ADJACENT_MAX = 3  # longest phrase checked for following itself
FINAL_PUNCTUATION = tuple("。！？!?.…")
DANGLING_WORDS = frozenset({"的", "和", "与", "及", "是", "在", "有", "一个", "了", "，", "、", "或", "着"})
_CLAUSE = re.compile(r"[，。！？；、,.!?;]")


def degenerate_reason(caption: str, ran_out: bool = False) -> str | None:
    """Why `caption` is degenerate ("unfinished", "repeated n-gram", "repeated clause") or None.
    `ran_out`: decoding stopped at max_new_tokens, not at a stop token."""
    text = caption.strip()
    if ran_out or not text or not text.endswith(FINAL_PUNCTUATION):
        return "unfinished"
    words = tokenize(text)
    if words and words[-1] in DANGLING_WORDS:
        return "unfinished"
    for n in range(1, ADJACENT_MAX + 1):
        if any(words[i:i + n] == words[i + n:i + 2 * n] for i in range(len(words) - 2 * n + 1)):
            return "repeated n-gram"
    seen = set()
    for i in range(len(words) - REPEAT_N + 1):
        gram = tuple(words[i:i + REPEAT_N])
        if gram in seen:
            return "repeated n-gram"
        seen.add(gram)
    clauses = [c.strip() for c in _CLAUSE.split(text) if c.strip()]
    if len(set(clauses)) < len(clauses):
        return "repeated clause"
    return None


def degenerate_share(captions, ran_out=None) -> float:
    """The share of degenerate captions (0.0 for none given)."""
    captions = list(captions)
    flags = [degenerate_reason(c, bool(ran_out[i]) if ran_out is not None else False) is not None
             for i, c in enumerate(captions)]
    return sum(flags) / len(flags) if flags else 0.0
