"""Batched generation with a KV cache: greedy, sampling and beam search, and continuous batching.

Prompts of different lengths are left-padded; the attention mask is explicit and positions are
derived from it, so a row's tokens see exactly what they would see alone (batched greedy output
equals one-by-one greedy output). Images are encoded once, in the prefill. A row that emits a stop
id leaves the batch: its KV-cache rows are dropped, so finished rows cost no more compute.
Logits processing runs in NumPy on the last position only.

Layers: `DecodeBatch` is the cache state (add rows, step, feed several tokens and roll back,
keep rows); `ContinuousBatch` drives it for greedy/sampling rows that join and leave at step
boundaries with per-row settings (what the caption service's engine uses); `generate` is the
one-call API on top of both.

Speculative decoding (draft and verify): given a drafter (`drafting.RetrievalDrafter`: any object
with `propose(rows, limits)` and `num_draft_tokens`), each step feeds every greedy row its greedy
token followed by up to k
drafted tokens in one forward (`DecodeBatch.step_many`), which returns the logits after each of
them. A row accepts drafted tokens while each equals the greedy choice of the logits before it,
then takes the model's own choice after the last accepted one (the next step's token); the cache
forgets the rejected ones (`DecodeBatch.rollback`). Each accepted token is exactly the token plain
greedy decoding would have produced at that point (same stop and length rules, repetition penalty
included), so the output is plain greedy's token for token, one-by-one or batched (tested); the
speed-up is the accepted tokens, which cost one forward for several. Sampling rows ride along
with one token each. `SpeculationStats` counts drafted and accepted tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np
import paddle

from .head import frozen_head
from .numpy_bridge import as_numpy


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    do_sample: bool = False
    num_beams: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    # Ids that end a row (() = none: run to max_new_tokens), and the id left padding uses. None
    # means "the tokenizer's" (`tokenizer.stop_ids`, `tokenizer.pad_id`): `with_tokenizer` fills them.
    stop_ids: tuple | None = None
    pad_id: int | None = None
    seed: int = 0
    # Candidates per prompt: the n best beams, or n samples. `generate` then returns n id lists per
    # prompt, one prompt's after another (as Hugging Face's `num_return_sequences`).
    num_return_sequences: int = 1

    def with_tokenizer(self, tokenizer) -> "GenerationConfig":
        """This config with the tokenizer's stop and pad ids where none are set."""
        return replace(self, stop_ids=tuple(tokenizer.stop_ids) if self.stop_ids is None else self.stop_ids,
                       pad_id=tokenizer.pad_id if self.pad_id is None else self.pad_id)

    def validate(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.num_beams < 1 or (self.num_beams > 1 and self.do_sample):
            raise ValueError("num_beams must be >= 1, and beam search does not sample")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature > 0, 0 < top_p <= 1, top_k >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.num_return_sequences < 1:
            raise ValueError("num_return_sequences must be >= 1")
        if self.num_return_sequences > 1 and not (self.do_sample or self.num_beams >= self.num_return_sequences):
            raise ValueError("num_return_sequences > 1 needs sampling or at least as many beams "
                             "(greedy decoding would repeat one caption)")


def left_pad(prompts: list[list[int]], pad_id: int):
    """Left-pad id lists -> (input_ids [B, T], attention_mask [B, T]) as int64 numpy arrays."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = prompt
        mask[i, width - len(prompt):] = 1
    return ids, mask


def apply_repetition_penalty(logits: np.ndarray, seen: list[np.ndarray], penalty: float):
    """CTRL-style: divide positive / multiply negative logits of every id already in the context."""
    if penalty == 1.0:
        return logits
    for row, ids in enumerate(seen):
        values = logits[row, ids]
        logits[row, ids] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample_tokens(logits: np.ndarray, cfg: GenerationConfig, rng) -> np.ndarray:
    """One sampled id per row. `rng` is one Generator (rows draw from it in order) or one per row."""
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = np.partition(logits, -cfg.top_k, axis=-1)[:, -cfg.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(log_softmax(logits))
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= cfg.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    rngs = rng if isinstance(rng, (list, tuple)) else [rng] * len(probs)
    return np.array([r.choice(len(p), p=p) for r, p in zip(rngs, probs)], dtype=np.int64)


class DecodeBatch:
    """The rows being decoded together: their KV cache, attention mask and next-token logits.

    This is the state every decoding strategy drives (greedy/sampling in `ContinuousBatch`, beam
    search, speculative decoding). Its whole API:

        batch = DecodeBatch(model)          # empty
        new = batch.add(prompts, images)    # prefill new rows; they join the running rows at the end
        batch.logits                        # [rows, vocab] float32 next-token logits, one per row
        batch.step(tokens)                  # feed one token per row; refreshes `logits`
        batch.step_many(tokens, lengths)    # feed several tokens per row in one forward -> the
                                            # logits after each of them
        batch.rollback(kept)                # then forget all but the first kept[i] tokens fed to row i
        batch.keep(rows)                    # keep/reorder rows: finished rows leave, beams reorder

    Layout: rows are right-aligned: every row's newest token sits in the last cache column; columns
    a row does not use are masked (mask 0): left padding of rows shorter than the widest one, and
    "holes" where `rollback` forgot tokens a row was fed but others kept. `add` prefills only the
    new rows (left-padded among themselves), then left-pads whichever cache is narrower with masked
    zeros and stacks the two. Positions come from the mask (`cumsum - 1`, see
    qwen.positions_from_mask) and masked keys get a -3.4e38 bias (an exact zero after softmax,
    whatever the masked key/value holds), so masked columns change nothing: a row's logits are what
    it gets decoded alone, up to float summation order (greedy tokens equal, tested). Rollback cuts
    the columns every row forgets and masks the rest; when holes make the cache wider than its
    longest row by more than an eighth, `compact` squeezes them out (one gather per cache tensor).
    After `keep`, leading columns that no remaining row uses are cut.

    Exactness holds while the cache width stays within `config.seq_length`: Qwen's dynamic NTK and
    log-n scaling look at the padded width (the same holds for any left-padded batch). Callers
    bound prompt + max_new_tokens by seq_length to keep it; `feed_room` says how many tokens a
    forward may take without crossing it (speculation feeds no more).

    The model must be in eval mode; forwards run under `paddle.no_grad()` (thread-safe: Paddle's
    grad switch is per thread, so an engine thread can own the batch).
    """

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.past = None  # per layer (k, v), each [rows, heads, width, head_dim]
        self.mask = None  # int64 [rows, width]: 1 = real token
        self.logits = np.zeros((0, 0), dtype=np.float32)
        self._fed = None  # after step_many, until the next change: what rollback needs

    def __len__(self) -> int:
        return len(self.logits)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def add(self, prompts: list[list[int]], images=None) -> np.ndarray:
        """Prefill `prompts` (with `images` [n_images, 3, S, S] for their `<img>` spans, in order)
        and append them as new rows; returns their row indices."""
        ids, mask = left_pad(prompts, self.pad_id)
        mask = paddle.to_tensor(mask)
        with paddle.no_grad():
            out = self.model(paddle.to_tensor(ids), images=images, attention_mask=mask,
                             use_cache=True, last_logits_only=True)
        logits = out.logits[:, -1].astype("float32").numpy()
        first = len(self)
        self._fed = None
        if self.past is None:
            self.past, self.mask, self.logits = out.past_key_values, mask, logits
        else:
            width = max(self.width, int(mask.shape[1]))
            self.past = [(paddle.concat([_pad_left(k_old, width), _pad_left(k_new, width)], axis=0),
                          paddle.concat([_pad_left(v_old, width), _pad_left(v_new, width)], axis=0))
                         for (k_old, v_old), (k_new, v_new) in zip(self.past, out.past_key_values)]
            self.mask = paddle.concat([_pad_left(self.mask, width), _pad_left(mask, width)], axis=0)
            self.logits = np.concatenate([self.logits, logits])
        return np.arange(first, len(self))

    def step(self, tokens: np.ndarray) -> None:
        """Append one token to every row (`tokens` [rows]) and compute the next logits."""
        self.step_many(np.asarray(tokens, dtype=np.int64).reshape(-1, 1))

    def step_many(self, tokens: np.ndarray, lengths=None) -> np.ndarray:
        """Feed row i the tokens tokens[i, :lengths[i]] (`tokens` [rows, m]; default: all m) in one
        forward; returns the logits after each fed token, [sum(lengths), vocab] float32, row by
        row. `logits` become each row's after its last fed token; `rollback` may then
        forget the tail of what a row was fed."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or len(tokens) != len(self):
            raise ValueError(f"need tokens [rows={len(self)}, m], got shape {tokens.shape}")
        rows, m = tokens.shape
        lengths = np.full(rows, m, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
        if len(lengths) != rows or lengths.min() < 1 or lengths.max() > m:
            raise ValueError(f"lengths must be in [1, {m}], one per row")
        fed = np.arange(m)[None, :] < lengths[:, None]  # padding after a row's tokens is masked
        self.mask = paddle.concat([self.mask, paddle.to_tensor(fed.astype(np.int64))], axis=1)
        flat = np.flatnonzero(fed.reshape(-1))  # row-major: row i's positions are consecutive
        with paddle.no_grad():
            out = self.model(paddle.to_tensor(np.where(fed, tokens, self.pad_id)), attention_mask=self.mask,
                             past_key_values=self.past, use_cache=True, logits_index=flat)
        self.past = out.past_key_values
        logits = out.logits if out.logits.dtype == paddle.float32 else out.logits.astype("float32")
        logits = as_numpy(logits)  # [sum(lengths), vocab]; a view
        self._fed = (m, lengths, np.cumsum(lengths) - lengths, logits)
        self._select(lengths)
        return logits

    def _select(self, kept: np.ndarray) -> None:
        """`logits` from the fed positions: row i's after its kept[i]-th fed token."""
        _, _, starts, logits = self._fed
        self.logits = logits[starts + kept - 1]  # a copy: callers may edit it (repetition penalty)

    def rollback(self, kept) -> None:
        """After `step_many`: keep only the first kept[i] (>= 1) tokens fed to row i, as if no more
        had been fed (their keys leave the cache, `logits` are the ones after the last kept)."""
        if self._fed is None:
            raise ValueError("rollback needs a step_many before it (and no add/keep in between)")
        m, lengths = self._fed[:2]
        kept = np.asarray(kept, dtype=np.int64)
        if len(kept) != len(lengths) or (kept < 1).any() or (kept > lengths).any():
            raise ValueError("kept[i] must be in [1, tokens fed to row i]")
        self._select(kept)
        self._fed = None
        forget = m - kept  # columns at each row's right end: rejected tokens and padding
        common = int(forget.min())
        if common:  # columns no row keeps are cut
            width = self.width - common
            self.mask = self.mask[:, :width]
            self.past = [(k[:, :, :width], v[:, :, :width]) for k, v in self.past]
            forget = forget - common
        if forget.any():  # the rest become holes: masked, so no later query sees them
            mask = self.mask.numpy()
            mask[np.arange(self.width)[None, :] >= (self.width - forget)[:, None]] = 0
            self.mask = paddle.to_tensor(mask)
            used = int(mask.sum(axis=1).max())
            if 8 * (self.width - used) > self.width:
                self.compact()

    def compact(self) -> None:
        """Squeeze masked columns out of every row and right-align it again: the cache becomes as
        wide as its longest row. Values are unchanged (masked columns carry no weight)."""
        mask = self.mask.numpy().astype(bool)
        used = mask.sum(axis=1)
        width, old = int(used.max()), self.width
        if width == old:
            return
        self._fed = None
        rows = len(mask)
        source = np.zeros((rows, width), dtype=np.int64)  # the old column of each new one
        fresh = np.zeros((rows, width), dtype=np.int64)
        for r in range(rows):
            source[r, width - used[r]:] = np.flatnonzero(mask[r])
            fresh[r, width - used[r]:] = 1
        self.mask = paddle.to_tensor(fresh)

        def squeeze(cache):  # [rows, heads, old, dim] -> [rows, heads, width, dim]
            heads, dim = int(cache.shape[1]), int(cache.shape[3])
            flat = ((np.arange(rows)[:, None, None] * heads + np.arange(heads)[None, :, None]) * old
                    + source[:, None, :]).reshape(-1)
            picked = paddle.gather(cache.reshape([-1, dim]), paddle.to_tensor(flat))
            return picked.reshape([rows, heads, width, dim])

        self.past = [(squeeze(k), squeeze(v)) for k, v in self.past]

    def feed_room(self, want: int) -> int:
        """How many of `want` tokens per row one forward may take while the cache stays within
        seq_length (beyond it, Qwen's dynamic NTK and log-n scaling depend on the forward's width,
        so a wider forward would not reproduce one-token steps); compacts holes away first when
        they cost room."""
        cfg = self.model.config
        if not (cfg.use_dynamic_ntk or cfg.use_logn_attn):
            return want
        if self.width + want > cfg.seq_length:
            self.compact()
        return max(min(want, cfg.seq_length - self.width), 0)

    def keep(self, rows) -> None:
        """Keep these rows, in this order (a row may repeat: beam search copies parents)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            self.__init__(self.model, self.pad_id)
            return
        self._fed = None
        self.logits = self.logits[rows]
        index = paddle.to_tensor(rows)
        mask = paddle.gather(self.mask, index)
        used = np.flatnonzero(mask.numpy().any(axis=0))
        first = int(used[0]) if len(used) else 0  # columns before it are padding in every row
        self.mask = mask[:, first:] if first else mask
        self.past = [(_cut_left(paddle.gather(k, index), first), _cut_left(paddle.gather(v, index), first))
                     for k, v in self.past]


def _pad_left(x, width: int):
    """Zero columns on the left of axis 1 (mask [B, T]) or axis 2 (cache [B, H, T, D]) up to `width`."""
    axis = 1 if len(x.shape) == 2 else 2
    missing = width - int(x.shape[axis])
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[axis] = missing
    return paddle.concat([paddle.zeros(shape, dtype=x.dtype), x], axis=axis)


def _cut_left(cache, first: int):
    return cache[:, :, first:] if first else cache


@dataclass
class Row:
    """One sequence of a `ContinuousBatch`: its settings, random stream and output so far."""

    config: GenerationConfig
    rng: np.random.Generator
    prompt_len: int
    tag: object = None  # the caller's handle (e.g. a request)
    tokens: list = field(default_factory=list)  # new ids, stop id excluded
    seen: np.ndarray | None = None  # context ids, for the repetition penalty
    finish_reason: str | None = None  # "stop" (a stop id) or "length" (max_new_tokens)
    draft_state: object = None  # the drafter's per-row state (e.g. its datastore match)


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
    """Greedy/sampling generation for rows that join and leave at step boundaries, each with its
    own `GenerationConfig` (max_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, stop_ids, seed). Beam search is not per-row: run it with `generate`.

        batch = ContinuousBatch(model)
        rows = batch.add(prompts, images, configs)   # any time between steps
        while batch: finished = batch.step()          # each step: one forward for every row
        batch.drop(some_rows)                         # e.g. the client went away

    A row's tokens do not depend on which rows share its batch (tested: a row that joins a running
    batch gets the tokens it gets alone). Each row samples from its own Generator (seeded with its
    config's seed) unless `add` is given one shared Generator (what `generate` does).

    With a `drafter`, greedy rows decode speculatively (see the module docstring): a step may add
    several tokens to a row, and the tokens are the same. `stats` (a `SpeculationStats`, shared if
    given) counts what drafting did.
    """

    def __init__(self, model, pad_id: int, drafter=None, stats: SpeculationStats | None = None):
        self.decoder = DecodeBatch(model, pad_id)
        self.rows: list[Row] = []  # in decoder row order
        self.drafter = drafter
        self.stats = stats if stats is not None else SpeculationStats()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, prompts: list[list[int]], images, configs: list[GenerationConfig], tags=None,
            rng: np.random.Generator | None = None) -> list[Row]:
        if len(configs) != len(prompts) or (tags is not None and len(tags) != len(prompts)):
            raise ValueError("need one config (and one tag) per prompt")
        for cfg in configs:
            cfg.validate()
            if cfg.num_beams != 1:
                raise ValueError("ContinuousBatch decodes greedy/sampling rows; use generate() for beam search")
            if cfg.stop_ids is None:
                raise ValueError("GenerationConfig needs stop_ids: use config.with_tokenizer(tokenizer)")
        new = [Row(cfg, rng if rng is not None else np.random.default_rng(cfg.seed), len(prompt),
                   None if tags is None else tags[i],
                   seen=np.unique(np.asarray(prompt, dtype=np.int64)) if cfg.repetition_penalty != 1.0 else None)
               for i, (prompt, cfg) in enumerate(zip(prompts, configs))]
        self.decoder.add(prompts, images)
        self.rows += new
        return new

    def step(self) -> list[Row]:
        """Choose every row's next token; rows that stop or reach max_new_tokens leave the batch
        (returned, with `finish_reason`); the others are fed their token (and, speculating, the
        drafted tokens after it, of which they keep what greedy decoding would have chosen)."""
        if not self.rows:
            return []
        tokens = self._choose(self.decoder.logits)
        done = [self._append(row, int(token)) for row, token in zip(self.rows, tokens)]
        finished = self._leave(done)
        if not self.rows:
            return finished
        tokens = tokens[np.logical_not(done)]
        drafts = self._drafts()
        self.stats.steps += 1
        self.stats.row_steps += len(self.rows)
        if drafts is None:
            self.decoder.step(tokens)
            return finished
        lengths = np.array([1 + len(d) for d in drafts], dtype=np.int64)
        feed = np.full((len(self.rows), int(lengths.max())), self.decoder.pad_id, dtype=np.int64)
        feed[:, 0] = tokens
        for i, draft in enumerate(drafts):
            feed[i, 1:1 + len(draft)] = draft
        logits = self.decoder.step_many(feed, lengths)
        kept = [1 + self._verify(row, draft, logits[start:start + len(draft)])
                for row, draft, start in zip(self.rows, drafts, np.cumsum(lengths) - lengths)]
        self.decoder.rollback(kept)
        self.stats.verify_steps += sum(1 for d in drafts if len(d))
        self.stats.drafted += int(lengths.sum()) - len(lengths)
        self.stats.accepted += sum(kept) - len(kept)
        return finished + self._leave([row.finish_reason is not None for row in self.rows])

    def _choose(self, logits: np.ndarray) -> np.ndarray:
        """Every row's next token from its next-token logits (repetition penalty, greedy, sampling)."""
        for i, row in enumerate(self.rows):
            if row.config.repetition_penalty != 1.0:
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

    def _leave(self, done: list[bool]) -> list[Row]:
        """Rows marked done leave the batch (and their cache rows); returns them."""
        if not any(done):
            return []
        still = [i for i, d in enumerate(done) if not d]
        finished = [row for row, d in zip(self.rows, done) if d]
        self.decoder.keep(still)
        self.rows = [self.rows[i] for i in still]
        return finished

    def _drafts(self) -> list[np.ndarray] | None:
        """Drafted tokens per row (greedy rows only, within max_new_tokens and the cache's room),
        or None when no row has any."""
        if self.drafter is None:
            return None
        room = self.decoder.feed_room(1 + self.drafter.num_draft_tokens) - 1  # the row's own token takes one
        greedy = [i for i, row in enumerate(self.rows) if not row.config.do_sample]
        if room < 1 or not greedy:
            return None
        limits = [min(room, self.rows[i].config.max_new_tokens - len(self.rows[i].tokens)) for i in greedy]
        proposed = self.drafter.propose([self.rows[i] for i in greedy], limits)
        drafts = [np.zeros(0, dtype=np.int64)] * len(self.rows)
        vocab = self.decoder.model.config.vocab_size
        for i, draft, limit in zip(greedy, proposed, limits):
            draft = np.asarray(draft, dtype=np.int64)[:limit]
            outside = np.flatnonzero((draft < 0) | (draft >= vocab))  # e.g. another vocabulary's datastore
            drafts[i] = draft[:outside[0]] if len(outside) else draft
        return drafts if any(len(d) for d in drafts) else None

    def _verify(self, row: Row, draft: np.ndarray, logits: np.ndarray) -> int:
        """Accept drafted tokens while each is the greedy choice of the logits before it (`logits`
        [len(draft), vocab]: after the row's token, after each drafted one); returns how many."""
        accepted = 0
        for token, after in zip(draft, logits):
            if row.config.repetition_penalty != 1.0:
                after = apply_repetition_penalty(after[None].copy(), [row.seen], row.config.repetition_penalty)[0]
            if int(after.argmax()) != int(token):
                break
            accepted += 1
            if self._append(row, int(token)):
                break
        return accepted

    def drop(self, rows: list[Row]) -> None:
        """Remove rows before they finish (their cache rows are freed)."""
        gone = {id(row) for row in rows}
        self._leave([id(row) in gone for row in self.rows])


def generate(model, prompts: list[list[int]], images=None, config: GenerationConfig | None = None,
             drafter=None, stats: SpeculationStats | None = None):
    """Generate a continuation for each prompt; returns new token ids per prompt (stop id excluded).

    `images` is a float tensor [n_images, 3, S, S] matched to the prompts' `<img>` spans in order.
    `drafter` makes greedy decoding speculative (same tokens; beam search ignores it); `stats`
    accumulates what it did.
    """
    cfg = config or GenerationConfig()
    cfg.validate()
    if cfg.stop_ids is None or cfg.pad_id is None:
        raise ValueError("GenerationConfig needs stop_ids and pad_id: use config.with_tokenizer(tokenizer)")
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad(), frozen_head(model.lm_head):  # weights cannot change in here
            if cfg.num_beams > 1:
                return _beam_search(model, prompts, images, cfg)
            n = cfg.num_return_sequences
            if n > 1:  # n samples per prompt: each prompt (and its images) n times in one batch
                images = _repeat_images(model, prompts, images, n)
                prompts = [p for p in prompts for _ in range(n)]
            return _greedy_or_sample(model, prompts, images, cfg, drafter, stats)
    finally:
        if was_training:
            model.train()


def _greedy_or_sample(model, prompts, images, cfg: GenerationConfig, drafter=None, stats=None):
    batch = ContinuousBatch(model, cfg.pad_id, drafter, stats)
    # One shared stream, drawn in row order: batched sampling reproduces earlier releases.
    rows = batch.add(prompts, images, [cfg] * len(prompts), rng=np.random.default_rng(cfg.seed))
    while batch:
        batch.step()
    return [row.tokens for row in rows]


def _repeat_images(model, prompts, images, times: int):
    """The images of each prompt repeated `times` times, in the order of the repeated prompts."""
    if images is None:
        return None
    spans_per_prompt = [sum(1 for t in p if t == model.config.image_start_id) for p in prompts]
    order, start = [], 0
    for n in spans_per_prompt:
        order.extend(list(range(start, start + n)) * times)
        start += n
    return paddle.gather(images, paddle.to_tensor(order, dtype="int64"))


def _beam_search(model, prompts, images, cfg: GenerationConfig):
    """Standard beam search; finished hypotheses are ranked by sum log-prob / length**length_penalty.
    Returns the best hypothesis per prompt, or the `num_return_sequences` best, one prompt's after
    another."""
    beams = cfg.num_beams
    expanded = [p for p in prompts for _ in range(beams)]
    images = _repeat_images(model, prompts, images, beams)
    decoder = DecodeBatch(model, cfg.pad_id)
    decoder.add(expanded, images)
    n = len(prompts)
    scores = np.zeros((n, beams), dtype=np.float64)
    scores[:, 1:] = -np.inf  # all beams start identical: expand only the first
    tokens_so_far = [[[] for _ in range(beams)] for _ in range(n)]
    finished = [[] for _ in range(n)]  # (normalised score, tokens)
    seen_base = [np.unique(np.asarray(p, dtype=np.int64)) for p in prompts]
    stop = set(cfg.stop_ids)
    done = np.zeros(n, dtype=bool)
    for step in range(cfg.max_new_tokens):
        seen = [np.union1d(seen_base[i], tokens_so_far[i][b]) for i in range(n) for b in range(beams)]
        logits = apply_repetition_penalty(decoder.logits, seen, cfg.repetition_penalty)
        logp = log_softmax(logits).reshape(n, beams, -1)
        vocab = logp.shape[-1]
        total = (scores[:, :, None] + logp).reshape(n, -1)
        top = np.argpartition(-total, 2 * beams, axis=-1)[:, : 2 * beams]
        next_rows, next_tokens = [], []
        for i in range(n):
            candidates = top[i][np.argsort(-total[i, top[i]])]
            new_scores, new_tokens, new_parents = [], [], []
            for flat in candidates:
                parent, token = divmod(int(flat), vocab)
                value = total[i, flat]
                if not np.isfinite(value):
                    continue
                if token in stop:
                    length = len(tokens_so_far[i][parent]) + 1
                    finished[i].append((value / length ** cfg.length_penalty, tokens_so_far[i][parent]))
                    continue
                new_scores.append(value)
                new_tokens.append(token)
                new_parents.append(parent)
                if len(new_scores) == beams:
                    break
            if len(finished[i]) >= beams or done[i]:
                done[i] = True
            while len(new_scores) < beams:  # keep shapes fixed; dead beams score -inf
                new_scores.append(-np.inf)
                new_tokens.append(cfg.pad_id)
                new_parents.append(0)
            scores[i] = new_scores
            tokens_so_far[i] = [tokens_so_far[i][p] + [t] for p, t in zip(new_parents, new_tokens)]
            next_rows.extend(i * beams + p for p in new_parents)
            next_tokens.extend(new_tokens)
        if done.all() or step == cfg.max_new_tokens - 1:
            break
        decoder.keep(np.asarray(next_rows))
        decoder.step(np.asarray(next_tokens, dtype=np.int64))
    results = []
    for i in range(n):
        pool = list(finished[i])
        if not done[i]:  # unfinished beams compete too
            for b in range(beams):
                if np.isfinite(scores[i, b]):
                    length = max(len(tokens_so_far[i][b]), 1)
                    pool.append((scores[i, b] / length ** cfg.length_penalty, tokens_so_far[i][b]))
        ranked = sorted(pool, key=lambda item: -item[0])[:cfg.num_return_sequences]
        ranked += [(0.0, [])] * (cfg.num_return_sequences - len(ranked))
        results.extend(list(tokens) for _, tokens in ranked)
    return results
