"""Log-probabilities of generated tokens, as OpenAI's API and vLLM report them: the chosen token's
log-probability under the model's own next-token distribution (the raw logits: before the
repetition penalty, temperature, top-k and top-p), and the most likely tokens at that position.

Two ways to get them, which agree with a full uncached forward within 1e-4 (tested):

- `LogprobRecorder`, the `observer` of a `scheduler.ContinuousBatch`: the scheduler shows it every
  step's raw next-token logits before it chooses (`on_choose`) and, speculating, the logits after
  each drafted token (`on_verify`); after the step, `collect(row)` pairs each token the row gained
  with the distribution it was chosen from. Only rows whose config asks (`logprobs=True`) cost
  anything. Beam rows are not followed (beams are re-selected every step): their finished
  hypotheses are scored with
- `teacher_forced`: finished token lists fed back after their prompts (a prefill and one forward
  for all tokens), for beam candidates and `predict_batch.py --scores`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenLogprob:
    """One generated token: its id, its log-probability, and the `top_logprobs` most likely
    (id, log-probability) pairs at its position, most likely first."""

    token: int
    logprob: float
    top: list = field(default_factory=list)


def _logsumexp(row: np.ndarray) -> float:
    peak = float(row.max())
    return peak + float(np.log(np.exp((row - peak).astype(np.float64)).sum()))


def token_logprob(logits_row: np.ndarray, token: int, top_n: int = 0, lse: float | None = None) -> TokenLogprob:
    """`token`'s log-probability under softmax(`logits_row`) [vocab], with the `top_n` best."""
    lse = _logsumexp(logits_row) if lse is None else lse
    top = []
    if top_n:
        best = np.argpartition(-logits_row, top_n - 1)[:top_n]
        best = best[np.argsort(-logits_row[best], kind="stable")]
        top = [(int(t), float(logits_row[t]) - lse) for t in best]
    return TokenLogprob(int(token), float(logits_row[token]) - lse, top)


def mean_logprob(entries: list[TokenLogprob]) -> float | None:
    """A caption's mean token log-probability (None for an empty caption): a length-fair confidence."""
    return float(np.mean([e.logprob for e in entries])) if entries else None


class LogprobRecorder:
    """Follows the greedy/sampling rows of a ContinuousBatch whose config has logprobs=True (set
    `batch.observer = recorder`); `collect(row)` after each step returns the row's TokenLogprobs so
    far (one per token in `row.tokens`)."""

    def __init__(self):
        self._pending: dict = {}  # row -> [logits or TokenLogprob] for the tokens it may gain this step
        self._done: dict = {}  # row -> [TokenLogprob], one per token in row.tokens

    @staticmethod
    def _wants(row) -> bool:
        return row.beams is None and row.config.logprobs

    def on_choose(self, rows, logits: np.ndarray) -> None:
        """Before a step chooses: `logits` [cache rows, vocab], raw (the scheduler edits them next)."""
        for i, row in enumerate(rows):
            if self._wants(row):
                self._pending[row] = [logits[i].copy()]

    def on_verify(self, rows, logits: np.ndarray, fed: np.ndarray, lengths: np.ndarray) -> None:
        """After a speculative forward: row i was fed fed[i, :lengths[i]] (its token, then drafts);
        `logits` [sum(lengths), vocab] are those after each fed token. A drafted token the row keeps
        is the one it was fed, so its entry is computed now and the logits are not kept."""
        starts = np.cumsum(lengths) - lengths
        for i, row in enumerate(rows):
            if not self._wants(row) or row not in self._pending:
                continue
            n = row.config.top_logprobs
            self._pending[row] += [token_logprob(logits[starts[i] + j], int(fed[i, j + 1]), n)
                                   for j in range(int(lengths[i]) - 1)]

    def collect(self, row) -> list[TokenLogprob]:
        """The row's entries, extended with the tokens it gained since the last call."""
        done = self._done.setdefault(row, [])
        pending = self._pending.pop(row, [])
        gained = row.tokens[len(done):]
        if len(gained) > len(pending):
            raise RuntimeError(f"{len(gained)} new tokens but {len(pending)} recorded distributions")
        for token, source in zip(gained, pending):
            if isinstance(source, TokenLogprob):
                if source.token != token:
                    raise RuntimeError(f"kept token {token} is not the drafted {source.token}")
                done.append(source)
            else:
                done.append(token_logprob(source, token, row.config.top_logprobs))
        return done

    def forget(self, row) -> None:
        """The row left (finished or dropped)."""
        self._pending.pop(row, None)
        self._done.pop(row, None)


def teacher_forced(model, prompts: list[list[int]], images, token_lists: list[list[int]], pad_id: int,
                   top_n: int = 0) -> list[list[TokenLogprob]]:
    """Each of `token_lists` scored after its prompt (`images` [n, 3, S, S] for the prompts' `<img>`
    spans, in order): the raw log-probability of every token given the prompt and the tokens
    before it. Two forwards through `DecodeBatch`, as generation computes them: the prefill (the
    first token's distribution), then every token but the last fed at once (`step_many`: the
    distributions after each), so it runs on any engine that generates (eager or exported)."""
    from .batch import DecodeBatch

    if not any(token_lists):
        return [[] for _ in token_lists]
    batch = DecodeBatch(model, pad_id)
    batch.add([list(p) for p in prompts], images)
    first = batch.logits.copy()
    feed = [list(t[:-1]) or [pad_id] for t in token_lists]  # a row with < 2 tokens is fed a pad it ignores
    lengths = np.array([len(f) for f in feed], dtype=np.int64)
    fed = np.full((len(feed), int(lengths.max())), pad_id, dtype=np.int64)
    for i, f in enumerate(feed):
        fed[i, :len(f)] = f
    after = batch.step_many(fed, lengths).logits
    starts = np.cumsum(lengths) - lengths
    result = []
    for i, tokens in enumerate(token_lists):
        rows = [first[i]] + [after[starts[i] + k] for k in range(len(tokens) - 1)]
        result.append([token_logprob(row, t, top_n) for row, t in zip(rows, tokens)])
    return result
