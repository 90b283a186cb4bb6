"""A finished job's candidates in the service's shapes: the choices of a chat completion (n
samples: one sequence each; n best beams: one sequence's candidates), OpenAI-shaped
log-probabilities, and the caption-level mean log-probability of `/v1/captions`."""
from __future__ import annotations

from dataclasses import dataclass

from ..decoding.logprobs import TokenLogprob, mean_logprob
from .protocol import ChoiceLogprobs, TokenLogprobOut, TopLogprob


@dataclass
class Candidate:
    index: int  # the choice index
    tokens: list
    finish_reason: str
    logprobs: list | None  # TokenLogprobs, when asked for


def finish_reason(tokens: list, config) -> str:
    return "length" if len(tokens) >= config.max_new_tokens else "stop"


def candidates(sequences) -> list[Candidate]:
    """The choices of a finished job, in order: each sequence's candidates (one, or the n best beams)."""
    out = []
    for seq in sequences:
        for k, tokens in enumerate(seq.candidates):
            reason = seq.finish_reason if k == 0 else finish_reason(tokens, seq.config)
            entries = seq.logprobs[k] if seq.logprobs is not None else None
            out.append(Candidate(len(out), tokens, reason, entries))
    return out


def mean(entries: list[TokenLogprob] | None) -> float | None:
    return None if entries is None else mean_logprob(entries)


def _token(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text and its exact bytes (a token may hold part of a multi-byte character:
    surrogateescape keeps the raw bytes through the text round trip)."""
    raw = tokenizer.decode([token], errors="surrogateescape").encode("utf-8", "surrogateescape")
    return raw.decode("utf-8", "replace"), list(raw)


def openai_logprobs(tokenizer, entries: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    """OpenAI's `logprobs` of a choice: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None
    content = []
    for entry in entries:
        text, raw = _token(tokenizer, entry.token)
        top = []
        for token, value in entry.top:
            t_text, t_raw = _token(tokenizer, token)
            top.append(TopLogprob(token=t_text, logprob=value, bytes=t_raw))
        content.append(TokenLogprobOut(token=text, logprob=entry.logprob, bytes=raw, top_logprobs=top))
    return ChoiceLogprobs(content=content)
