"""The scheduler: `ContinuousBatch`, every request kind decoded in one batch that rows join and
leave at step boundaries, each with its own `GenerationConfig`.

Greedy and sampling requests take one cache row each; a beam request takes `num_beams` rows that
`beam.BeamSearch` re-selects every step (the cache's `keep` copies and reorders them). A row that
emits a stop id or reaches max_new_tokens leaves the batch: its cache rows are dropped, so
finished rows cost no more compute.

Speculative decoding (draft and verify): given a drafter (`drafting.RetrievalDrafter`: any object
with `propose(rows, limits)` and `num_draft_tokens`), each step feeds every greedy row its greedy
token followed by up to k drafted tokens in one forward (`DecodeBatch.step_many`), which returns
the outputs after each of them (the greedy tokens; the logits when a row needs them). A row accepts drafted tokens while each equals the greedy choice of
the logits before it, then takes the model's own choice after the last accepted one (the next
step's token); the cache forgets the rejected ones (`DecodeBatch.rollback`). Each accepted token is
exactly the token plain greedy decoding would have produced at that point (same stop and length
rules, repetition penalty included), so the output is plain greedy's token for token, one-by-one or
batched (tested); the speed-up is the accepted tokens, which cost one forward for several.
Sampling and beam rows ride along with one token each. `SpeculationStats` counts what drafting did.
A drafter with a `budget` (`draft_budget.DraftBudget`) has each step's drafts cut to the width
that pays on this machine, down to a plain step.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .batch import DecodeBatch, repeat_images
from .beam import BeamSearch
from .config import GenerationConfig
from .drafting import Draft
from .logits import apply_repetition_penalty, sample_tokens


def _plain_greedy(row: "Row") -> bool:
    """A row whose next token is the argmax of the raw logits (no sampling, beams or penalty)."""
    return row.beams is None and not row.config.do_sample and row.config.repetition_penalty == 1.0


@dataclass(eq=False)
class Row:
    """One request of a `ContinuousBatch`: its settings, random stream and output so far. A beam
    request is one Row over `num_beams` cache rows (`beams` holds its search)."""

    config: GenerationConfig
    rng: np.random.Generator
    prompt_len: int
    tag: object = None  # the caller's handle (e.g. a request)
    tokens: list = field(default_factory=list)  # new ids, stop id excluded (beam: the best hypothesis)
    seen: np.ndarray | None = None  # context ids, for the repetition penalty
    finish_reason: str | None = None  # "stop" (a stop id) or "length" (max_new_tokens)
    draft_state: object = None  # the drafter's per-row state (e.g. its datastore match)
    beams: BeamSearch | None = None
    candidates: list | None = None  # beam: the num_return_sequences best hypotheses, once finished


@dataclass
class SpeculationStats:
    """What drafting did: decode forwards, rows fed in them, drafted and accepted tokens."""

    steps: int = 0  # decode forwards (each feeds every running row)
    row_steps: int = 0  # rows fed, summed over those forwards
    verify_steps: int = 0  # row-steps that carried a draft
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens generated (stop ids excluded)

    def add(self, other: "SpeculationStats") -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted tokens / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def accepted_per_verify(self) -> float:
        """Mean drafted tokens accepted per verify step (a row's forward with a draft)."""
        return self.accepted / self.verify_steps if self.verify_steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens a row gains per forward it takes part in (plain decoding: 1)."""
        return (self.row_steps + self.accepted) / self.row_steps if self.row_steps else 0.0

    def summary(self) -> dict:
        return {**asdict(self), "acceptance_rate": round(self.acceptance_rate, 4),
                "accepted_per_verify": round(self.accepted_per_verify, 3),
                "tokens_per_step": round(self.tokens_per_step, 3)}


class ContinuousBatch:
    """Requests that join and leave at step boundaries, each with its own `GenerationConfig`.

        batch = ContinuousBatch(model, pad_id)
        rows = batch.add(prompts, images, configs)   # any time between steps
        while batch: finished = batch.step()          # each step: one forward for every cache row
        batch.drop(some_rows)                         # e.g. the client went away

    A request's tokens do not depend on which others share its batch (tested: a row that joins a
    running batch gets the tokens it gets alone; a beam request gets what beam search alone gives).
    Each sampling row draws from its own Generator (seeded with its config's seed) unless `add` is
    given one shared Generator (what `generate` does). `len(batch)` counts cache rows.

    With a `drafter`, greedy rows decode speculatively (see the module docstring): a step may add
    several tokens to a row, and the tokens are the same. `stats` (a `SpeculationStats`, shared if
    given) counts what drafting did.
    """

    def __init__(self, model, pad_id: int, drafter=None, stats: SpeculationStats | None = None):
        self.decoder = DecodeBatch(model, pad_id, keep_hidden=getattr(drafter, "needs_hidden", False))
        self.rows: list[Row] = []  # one per cache row, in cache order; a beam Row fills num_beams in a run
        self.drafter = drafter
        self.stats = stats if stats is not None else SpeculationStats()
        self.observer = None  # e.g. a logprobs.LogprobRecorder: sees the raw logits each step

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def requests(self) -> list[Row]:
        """The running requests, once each (a beam request holds several cache rows)."""
        return list({id(row): row for row in self.rows}.values())

    def add(self, prompts: list[list[int]], images, configs: list[GenerationConfig], tags=None,
            rng: np.random.Generator | None = None) -> list[Row]:
        """Prefill `prompts` (`images` [n_images, 3, S, S] for their `<img>` spans, in order) as new
        requests; returns their Rows."""
        if len(configs) != len(prompts) or (tags is not None and len(tags) != len(prompts)):
            raise ValueError("need one config (and one tag) per prompt")
        if any(cfg.stop_ids is None for cfg in configs):
            raise ValueError("GenerationConfig needs stop_ids: use config.with_tokenizer(tokenizer)")
        new = []
        for i, (prompt, cfg) in enumerate(zip(prompts, configs)):
            beam = cfg.num_beams > 1
            seen = np.unique(np.asarray(prompt, dtype=np.int64)) if cfg.repetition_penalty != 1.0 and not beam else None
            new.append(Row(cfg, rng if rng is not None else np.random.default_rng(cfg.seed), len(prompt),
                           None if tags is None else tags[i], seen=seen,
                           beams=BeamSearch(prompt, cfg) if beam else None))
        copies = [row.beams.width if row.beams is not None else 1 for row in new]
        if max(copies, default=1) > 1:  # a beam request's rows start as copies of its prompt
            images = repeat_images(self.decoder.model, prompts, images, copies)
            prompts = [p for p, k in zip(prompts, copies) for _ in range(k)]
        self.decoder.add(prompts, images)
        self.rows += [row for row, k in zip(new, copies) for _ in range(k)]
        return new

    def step(self) -> list[Row]:
        """Choose every request's next token(s); requests that finish leave the batch (returned,
        with `finish_reason`); the others are fed their token (greedy rows, speculating: and the
        drafted tokens after it, of which they keep what greedy decoding would have chosen)."""
        if not self.rows:
            return []
        logits = None
        if self.observer is None and all(_plain_greedy(row) for row in self.rows):
            tokens = self.decoder.greedy()  # no logits needed (on a CPU: none computed, greedy_head.py)
        else:
            logits = self.decoder.logits
            if self.observer is not None:  # the raw logits, before _choose edits them (logprobs.py)
                self.observer.on_choose(self.rows, logits)
            tokens = self._choose(logits)
        keep, feed, finished, i = [], [], [], 0
        while i < len(self.rows):
            row = self.rows[i]
            if row.beams is None:
                if self._append(row, int(tokens[i])):
                    finished.append(row)
                else:
                    keep.append(i)
                    feed.append(tokens[i])
                i += 1
                continue
            width = row.beams.width
            chosen = row.beams.advance(logits[i:i + width])
            if chosen is None:
                self._finish_beams(row)
                finished.append(row)
            else:
                keep.extend(i + parent for parent in chosen[0])
                feed.extend(chosen[1])
            i += width
        self._keep(keep)
        if not self.rows:
            return finished
        tokens = np.asarray(feed, dtype=np.int64)
        drafts = self._drafts()
        budget = getattr(self.drafter, "budget", None)
        width = 0 if drafts is None else max(len(d) for d in drafts)
        if budget is not None and drafts is not None:
            width = budget.choose(drafts)
            drafts = [d.cut(width) for d in drafts] if width else None
        self.stats.steps += 1
        self.stats.row_steps += len(self.rows)
        started = time.perf_counter()
        if drafts is None:
            self.decoder.step(tokens)
            if budget is not None:
                budget.record(len(self.rows), 0, time.perf_counter() - started)
            return finished
        lengths = np.array([1 + len(d) for d in drafts], dtype=np.int64)
        fed = np.full((len(self.rows), int(lengths.max())), self.decoder.pad_id, dtype=np.int64)
        fed[:, 0] = tokens
        for i, draft in enumerate(drafts):
            fed[i, 1:1 + len(draft)] = draft.tokens
        outputs = self.decoder.step_many(fed, lengths)
        if self.observer is not None:  # the logits after each drafted token (logprobs.py)
            self.observer.on_verify(self.rows, outputs.logits, fed, lengths)
        kept = [1 + self._verify(row, draft.tokens, outputs, start)
                for row, draft, start in zip(self.rows, drafts, np.cumsum(lengths) - lengths)]
        self.decoder.rollback(kept)
        accepted = sum(kept) - len(kept)
        if budget is not None:
            budget.record(len(self.rows), width, time.perf_counter() - started,
                          expected=float(sum(d.cumulative.sum() for d in drafts)), accepted=accepted)
        self.stats.verify_steps += sum(1 for d in drafts if len(d))
        self.stats.drafted += int(lengths.sum()) - len(lengths)
        self.stats.accepted += accepted
        return finished + self._leave([row.finish_reason is not None for row in self.rows])

    def _choose(self, logits: np.ndarray) -> np.ndarray:
        """Every greedy/sampling row's next token from its next-token logits (repetition penalty,
        greedy, sampling); beam rows' entries are unused."""
        for i, row in enumerate(self.rows):
            if row.beams is None and row.config.repetition_penalty != 1.0:
                logits[i:i + 1] = apply_repetition_penalty(logits[i:i + 1], [row.seen], row.config.repetition_penalty)
        tokens = logits.argmax(axis=-1)
        groups: dict[tuple, list[int]] = {}  # rows sampling with the same settings, in row order
        for i, row in enumerate(self.rows):
            if row.config.do_sample:
                groups.setdefault((row.config.temperature, row.config.top_k, row.config.top_p), []).append(i)
        for members in groups.values():
            cfg = self.rows[members[0]].config
            tokens[members] = sample_tokens(logits[members], cfg, [self.rows[i].rng for i in members])
        return tokens

    def _append(self, row: Row, token: int) -> bool:
        """Give `row` its next token; True if that finishes it (a stop id, or max_new_tokens)."""
        if token in row.config.stop_ids:
            row.finish_reason = "stop"
            return True
        row.tokens.append(token)
        self.stats.tokens += 1
        if row.seen is not None:
            row.seen = np.union1d(row.seen, [token])
        if len(row.tokens) >= row.config.max_new_tokens:
            row.finish_reason = "length"
        return row.finish_reason is not None

    def _finish_beams(self, row: Row) -> None:
        row.candidates = row.beams.results()
        row.tokens = row.candidates[0]
        row.finish_reason = "length" if len(row.tokens) >= row.config.max_new_tokens else "stop"
        self.stats.tokens += len(row.tokens)

    def _keep(self, keep: list[int]) -> None:
        """Keep these cache rows in this order (rows may repeat: beams copy their parents)."""
        if keep == list(range(len(self.rows))):
            return  # nothing left or moved: the cache stays as it is
        self.decoder.keep(keep)
        self.rows = [self.rows[i] for i in keep]

    def _leave(self, done: list[bool]) -> list[Row]:
        """Rows marked done leave the batch (and their cache rows); returns them, once each."""
        if not any(done):
            return []
        finished = list({id(row): row for row, d in zip(self.rows, done) if d}.values())
        self._keep([i for i, d in enumerate(done) if not d])
        return finished

    def _drafts(self) -> list[Draft] | None:
        """Drafted tokens per row (greedy rows only, within max_new_tokens and the cache's room),
        or None when no row has any. Drafters that read hidden states (`needs_hidden`: draft heads)
        get each greedy row's final hidden state behind the token it just chose."""
        if self.drafter is None:
            return None
        room = self.decoder.feed_room(1 + self.drafter.num_draft_tokens) - 1  # the row's own token takes one
        greedy = [i for i, row in enumerate(self.rows) if not row.config.do_sample and row.beams is None]
        if room < 1 or not greedy:
            return None
        limits = [min(room, self.rows[i].config.max_new_tokens - len(self.rows[i].tokens)) for i in greedy]
        rows = [self.rows[i] for i in greedy]
        if getattr(self.drafter, "needs_hidden", False):
            hidden = None if self.decoder.hidden is None else self.decoder.hidden[greedy]
            proposed = self.drafter.propose(rows, limits, hidden)
        else:
            proposed = self.drafter.propose(rows, limits)
        drafts = [Draft.empty()] * len(self.rows)
        vocab = self.decoder.model.config.vocab_size
        for i, draft, limit in zip(greedy, proposed, limits):
            draft = Draft.of(draft).cut(limit)
            outside = np.flatnonzero((draft.tokens < 0) | (draft.tokens >= vocab))  # e.g. another vocabulary's datastore
            drafts[i] = draft.cut(outside[0]) if len(outside) else draft
        return drafts if any(len(d) for d in drafts) else None

    def _verify(self, row: Row, draft: np.ndarray, outputs, start: int) -> int:
        """Accept drafted tokens while each is the greedy choice of the outputs before it
        (`outputs` of `step_many`, this row's from `start`: after the row's token, after each drafted
        one); returns how many. The repetition penalty needs the logits (it depends on the tokens
        accepted so far); without it the greedy tokens suffice."""
        if not len(draft):
            return 0
        penalty = row.config.repetition_penalty
        choices = None if penalty != 1.0 else outputs.greedy()[start:start + len(draft)]
        accepted = 0
        for j, token in enumerate(draft):
            if choices is None:
                after = outputs.logits[start + j]
                choice = int(apply_repetition_penalty(after[None].copy(), [row.seen], penalty)[0].argmax())
            else:
                choice = int(choices[j])
            if choice != int(token):
                break
            accepted += 1
            if self._append(row, int(token)):
                break
        return accepted

    def drop(self, rows: list[Row]) -> None:
        """Remove requests before they finish (their cache rows are freed)."""
        gone = {id(row) for row in rows}
        self._leave([id(row) in gone for row in self.rows])

