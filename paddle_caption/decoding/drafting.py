"""Drafting for speculative decoding: the drafts every drafter returns (`Draft`), retrieval drafting
from the training captions (`RetrievalDrafter`, over `datastore.DraftDatastore`), and `load_drafter`,
which builds the drafter `--speculative` names (retrieval, heads, hybrid: see head_drafting.py).

`RetrievalDrafter` keeps, per decoded row, the longest suffix of the row's text so far (start
marker + generated tokens) that occurs in the datastore, with its range, and extends it as tokens
are accepted (one binary search per token; a fresh search only when the text leaves every stored
caption). It drafts by following the most frequent continuation for up to `num_draft_tokens`
tokens. The drafts only decide speed: `scheduler.ContinuousBatch` verifies every draft against the
model's own greedy choice, so the output is plain greedy's whatever the datastore holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime import UserError
from .datastore import START, DraftDatastore, load_datastore

SPECULATIVE_MODES = ("none", "retrieval", "heads", "hybrid")
DEFAULT_DRAFT_TOKENS = 16
DEFAULT_MIN_SHARE = 0.5


@dataclass
class Draft:
    """Drafted tokens and each one's conditional probability of being right (same length)."""

    tokens: np.ndarray
    probs: np.ndarray

    @classmethod
    def empty(cls) -> "Draft":
        return cls(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))

    @classmethod
    def of(cls, proposal) -> "Draft":
        """A drafter's proposal as a Draft: token arrays without estimates count as certain."""
        if isinstance(proposal, Draft):
            return proposal
        tokens = np.asarray(proposal, dtype=np.int64).reshape(-1)
        return cls(tokens, np.ones(len(tokens), dtype=np.float64))

    def __len__(self) -> int:
        return len(self.tokens)

    def cut(self, n: int) -> "Draft":
        return Draft(self.tokens[:n], self.probs[:n])

    @property
    def cumulative(self) -> np.ndarray:
        """P(the first j+1 tokens are all accepted), as the drafter estimates it."""
        return np.cumprod(self.probs)


@dataclass
class _Cursor:
    """A hypothetical continuation of a row's text and its match: text[start:] occurs at [lo, hi)."""

    text: list
    start: int
    lo: int
    hi: int


@dataclass
class _Match:
    """A row's longest matching suffix: text[start:] occurs at suffix-array range [lo, hi)."""

    start: int
    lo: int
    hi: int
    seen: int  # how much of the row's text this match has taken in


class RetrievalDrafter:
    """Drafts each greedy row's next tokens from a `DraftDatastore` (see the module docstring).

    `propose(rows, limits)` (what `ContinuousBatch` calls, with its greedy rows) returns one int64
    array per row (at most limits[i] tokens, maybe none); a row's matching state lives on it
    (`row.draft_state`).
    """

    name = "retrieval"

    def __init__(self, store: DraftDatastore, num_draft_tokens: int = DEFAULT_DRAFT_TOKENS, stop_ids=(),
                 min_share: float = DEFAULT_MIN_SHARE):
        if not 1 <= num_draft_tokens < store.depth:
            raise ValueError(f"num_draft_tokens must be in [1, {store.depth - 1}] for this datastore")
        if not 0.0 <= min_share <= 1.0:
            raise ValueError("min_share must be in [0, 1]")
        self.store, self.num_draft_tokens = store, int(num_draft_tokens)
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.min_share = float(min_share)
        # a match longer than this is shortened, so a draft never reads past the sorted depth
        self.max_match = store.depth - self.num_draft_tokens
        self.resync_length = max(1, self.max_match // 2)

    def propose(self, rows, limits, hidden=None) -> list[Draft]:
        return [self.draft(row, limit) for row, limit in zip(rows, limits)]

    def draft(self, row, limit: int) -> Draft:
        limit = min(int(limit), self.num_draft_tokens)
        if limit <= 0:
            return Draft.empty()
        cursor, out, probs, share = self.cursor(row), [], [], 1.0
        while len(out) < limit:
            choice = self.peek(cursor)
            if choice is None:
                break
            token, step = choice
            # The share of the matches that continue this way all along the draft: an estimate of
            # the chance the whole draft is accepted. Below min_share the token is not worth a place.
            share *= step
            if share < self.min_share:
                break
            out.append(token)
            probs.append(step)
            if token in self.stop_ids:
                break
            self.advance(cursor, token)
        return Draft(np.asarray(out, dtype=np.int64), np.asarray(probs, dtype=np.float64))

    # ---- a cursor over a hypothetical continuation (draft() and the hybrid drafter walk it) ----------
    def cursor(self, row) -> "_Cursor":
        """Where the row's text so far (start marker + its tokens) stands in the datastore."""
        text = [START] + list(row.tokens)
        match = self._update(getattr(row, "draft_state", None), text)
        row.draft_state = match
        return _Cursor(text, match.start, match.lo, match.hi)

    def peek(self, cursor: "_Cursor") -> tuple[int, float] | None:
        """(the most frequent next token after the cursor's text, the share of matches that continue
        with it), or None when the datastore predicts nothing there."""
        offset = len(cursor.text) - cursor.start
        if cursor.hi <= cursor.lo or offset <= 0 or offset >= self.store.depth:
            return None
        token, run_lo, run_hi = self.store.most_frequent(cursor.lo, cursor.hi, offset)
        if token < 0:  # a caption's start or the store's end
            return None
        return token, (run_hi - run_lo) / (cursor.hi - cursor.lo)

    def advance(self, cursor: "_Cursor", token: int) -> None:
        """Extend the cursor's text by `token` (any token: the hybrid drafter also feeds the heads'):
        narrow the match, or find the longest matching suffix again when the text leaves every
        stored caption (or outgrows the sorted depth)."""
        offset = len(cursor.text) - cursor.start
        cursor.text.append(int(token))
        if cursor.hi > cursor.lo and offset < self.store.depth - 1:
            lo, hi = self.store.narrow(cursor.lo, cursor.hi, offset, int(token))
            if lo < hi:
                cursor.lo, cursor.hi = lo, hi
                return
        match = self._longest_suffix(cursor.text)
        cursor.start, cursor.lo, cursor.hi = match.start, match.lo, match.hi

    def _update(self, match: _Match | None, text: list) -> _Match:
        """Take in the tokens added to `text` since the last call."""
        if match is None or match.seen > len(text):
            match = _Match(0, *self.store.find(text[:1]), seen=1)
        store = self.store
        for end in range(match.seen, len(text)):
            length = end - match.start  # text[match.start:end] is matched; extend it by text[end]
            lo, hi = (store.narrow(match.lo, match.hi, length, int(text[end]))
                      if length < self.max_match else (0, 0))
            if lo < hi:
                match.lo, match.hi = lo, hi
            else:
                match = self._longest_suffix(text[:end + 1])
            match.seen = end + 1
        return match

    def _longest_suffix(self, text: list) -> _Match:
        """The longest suffix of `text` (up to resync_length tokens) that occurs: binary search on
        its length (if a suffix occurs, every shorter one does)."""
        best = (len(text), 0, self.store.size)  # the empty suffix matches everything
        short, long = 1, min(self.resync_length, len(text))
        while short <= long:
            mid = (short + long) // 2
            lo, hi = self.store.find(text[len(text) - mid:])
            if lo < hi:
                best, short = (len(text) - mid, lo, hi), mid + 1
            else:
                long = mid - 1
        return _Match(*best, seen=len(text))


def load_drafter(mode: str, model_dir, tokenizer, source=None, num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
                 min_share: float = DEFAULT_MIN_SHARE, log=None, model=None, budget: bool = True):
    """The drafter `predict_batch.py --speculative MODE` uses (None for "none"):

    - "retrieval": the training captions' datastore (`source`, else MODEL_DIR/draft_datastore);
    - "heads": the model's draft heads (`model.draft_heads`, else MODEL_DIR/draft_heads.*; trained
      by the `draft_heads` fine-tune mode), see `head_drafting.HeadDrafter`;
    - "hybrid": both, the more confident at each draft position (`head_drafting.HybridDrafter`).

    With `budget` (default) each step feeds only the draft tokens that pay on this machine
    (`draft_budget.DraftBudget`), down to a plain step."""
    if mode not in SPECULATIVE_MODES:
        raise UserError(f"speculative mode must be one of {', '.join(SPECULATIVE_MODES)}, not {mode!r}")
    if mode == "none":
        return None
    from .draft_budget import DraftBudget

    retrieval = heads = None
    if mode in ("retrieval", "hybrid"):
        store = load_datastore(model_dir, tokenizer, source, log)
        try:
            retrieval = RetrievalDrafter(store, num_draft_tokens, stop_ids=tokenizer.stop_ids, min_share=min_share)
        except ValueError as err:
            raise UserError(str(err)) from None
    if mode in ("heads", "hybrid"):
        heads = load_head_drafter(model, model_dir, tokenizer)
    drafter = retrieval if mode == "retrieval" else heads if mode == "heads" else None
    if drafter is None:
        from .head_drafting import HybridDrafter

        drafter = HybridDrafter(retrieval, heads)
    drafter.budget = DraftBudget() if budget else None
    return drafter


def load_head_drafter(model, model_dir, tokenizer):
    """A `HeadDrafter` over the model's draft heads (loaded with it, or from MODEL_DIR)."""
    from ..model.draft_heads import HeadWeights, has_draft_heads
    from .head_drafting import HeadDrafter

    layer = getattr(model, "draft_heads", None) if model is not None else None
    if layer is not None:
        weights = HeadWeights.from_layer(layer)
    elif has_draft_heads(model_dir):
        weights = HeadWeights.from_directory(model_dir)
    else:
        raise UserError(f"{model_dir} has no draft heads (draft_heads.json): train them with a config "
                        "whose finetune_mode is 'draft_heads' (docs/decoding.md), or use --speculative retrieval")
    lm_head_t = None
    if not weights.config.draft_vocab:  # heads that project through the model's own output layer
        lm_head_t = output_layer_transposed(model)
    return HeadDrafter(weights, lm_head_t, stop_ids=tokenizer.stop_ids)


def output_layer_transposed(model) -> np.ndarray:
    """The output layer's weight as a [vocab, hidden] float32 array: the transposed copy decoding
    already keeps (the exported engine's `OutputHead`, or `output_head.keep_transposed_head` on an
    eager model loaded for prediction), so full-vocabulary heads cost no second copy."""
    head = getattr(model, "head", None)
    if head is not None and hasattr(head, "weight_t"):  # deploy.engine.OutputHead
        return head.weight_t
    from .output_head import kept_transposed_weight

    return kept_transposed_weight(model.lm_head)
