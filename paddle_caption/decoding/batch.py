"""The KV-cache batch every decoding strategy drives (`DecodeBatch`), and left padding.

Prompts of different lengths are left-padded; the attention mask is explicit and positions are
derived from it, so a row's tokens see exactly what they would see alone (batched greedy output
equals one-by-one greedy output). Images are encoded once, in the prefill.
"""
from __future__ import annotations

import numpy as np
import paddle

from ..model.numpy_bridge import as_numpy
from .greedy_head import greedy_head_for


def left_pad(prompts: list[list[int]], pad_id: int):
    """Left-pad id lists -> (input_ids [B, T], attention_mask [B, T]) as int64 numpy arrays."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = prompt
        mask[i, width - len(prompt):] = 1
    return ids, mask


class DecodeBatch:
    """The rows being decoded together: their KV cache, attention mask and next-token logits.

    This is the state every decoding strategy drives (`scheduler.ContinuousBatch`: greedy, sampling,
    beam groups, speculative decoding). Its whole API:

        batch = DecodeBatch(model)          # empty
        new = batch.add(prompts, images)    # prefill new rows; they join the running rows at the end
        batch.logits                        # [rows, vocab] float32 next-token logits, one per row
        batch.greedy()                      # [rows] their argmax (the greedy tokens)
        batch.hidden                        # with keep_hidden: [rows, C] the final hidden states they
                                            # come from (draft heads read them); else None
        batch.step(tokens)                  # feed one token per row; refreshes `logits`
        batch.step_many(tokens, lengths)    # feed several tokens per row in one forward -> the
                                            # `Outputs` after each of them (.logits, .greedy())
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

    Where the output layer runs in numpy on the CPU (`greedy_head.greedy_head_for`), forwards skip
    it: the batch keeps the final hidden states, `greedy()` takes the greedy tokens from them
    through the `GreedyHead` (exact, without the full product), and `logits` are computed only
    when asked for (sampling, beams, repetition penalty, logprobs). Elsewhere (a GPU, Paddle's
    kernels) the forward returns the logits and `greedy()` is their argmax.

    The model must be in eval mode; forwards run under `paddle.no_grad()` (thread-safe: Paddle's
    grad switch is per thread, so an engine thread can own the batch).
    """

    def __init__(self, model, pad_id: int, keep_hidden: bool = False):
        # keep_hidden: only a drafter that reads hidden states asks for them; otherwise no step pays
        # for copying them to the host (a device-to-host transfer per step on a GPU)
        self.model, self.pad_id, self.keep_hidden = model, pad_id, keep_hidden
        self.head = greedy_head_for(model)  # None: the model computes logits
        self.past = None  # per layer (k, v), each [rows, heads, width, head_dim]
        self.mask = None  # int64 [rows, width]: 1 = real token
        self.out = Outputs(np.zeros((0, 0), dtype=np.float32), None, None)  # row i's next-token outputs
        self._fed = None  # after step_many, until the next change: what rollback needs

    def __len__(self) -> int:
        return len(self.out)

    @property
    def logits(self) -> np.ndarray:
        """[rows, vocab] float32 next-token logits (callers may edit them: repetition penalty)."""
        return self.out.logits

    @property
    def hidden(self) -> np.ndarray | None:
        """float32 [rows, C], row i's final hidden state behind logits[i] (None unless kept)."""
        return self.out.hidden

    def greedy(self) -> np.ndarray:
        """Each row's greedy next token, int64 [rows]."""
        return self.out.greedy()

    def _forward(self, ids, **kwargs):
        if self.head is not None:
            kwargs["skip_head"] = True
        with paddle.no_grad():
            out = self.model(ids, use_cache=True, **kwargs)
        hidden = _hidden_rows(out) if self.keep_hidden or self.head is not None else None
        return out, hidden

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def add(self, prompts: list[list[int]], images=None) -> np.ndarray:
        """Prefill `prompts` (with `images` [n_images, 3, S, S] for their `<img>` spans, in order)
        and append them as new rows; returns their row indices."""
        ids, mask = left_pad(prompts, self.pad_id)
        mask = paddle.to_tensor(mask)
        out, hidden = self._forward(paddle.to_tensor(ids), images=images, attention_mask=mask, last_logits_only=True)
        new = Outputs(None if out.logits is None else out.logits[:, -1].astype("float32").numpy(), hidden, self.head)
        first = len(self)
        self._fed = None
        if self.past is None:
            self.past, self.mask, self.out = out.past_key_values, mask, new
        else:
            width = max(self.width, int(mask.shape[1]))
            self.past = [(paddle.concat([_pad_left(k_old, width), _pad_left(k_new, width)], axis=0),
                          paddle.concat([_pad_left(v_old, width), _pad_left(v_new, width)], axis=0))
                         for (k_old, v_old), (k_new, v_new) in zip(self.past, out.past_key_values)]
            self.mask = paddle.concat([_pad_left(self.mask, width), _pad_left(mask, width)], axis=0)
            self.out = self.out.join(new)
        return np.arange(first, len(self))

    def step(self, tokens: np.ndarray) -> None:
        """Append one token to every row (`tokens` [rows]) and compute the next logits."""
        self.step_many(np.asarray(tokens, dtype=np.int64).reshape(-1, 1))

    def step_many(self, tokens: np.ndarray, lengths=None) -> "Outputs":
        """Feed row i the tokens tokens[i, :lengths[i]] (`tokens` [rows, m]; default: all m) in one
        forward; returns the `Outputs` after each fed token, sum(lengths) of them, row by row
        (`.logits` [sum(lengths), vocab] float32, `.greedy()`). `logits` become each row's after
        its last fed token; `rollback` may then forget the tail of what a row was fed."""
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
        out, hidden = self._forward(paddle.to_tensor(np.where(fed, tokens, self.pad_id)), attention_mask=self.mask,
                                    past_key_values=self.past, logits_index=flat)
        self.past = out.past_key_values
        logits = None
        if out.logits is not None:
            logits = out.logits if out.logits.dtype == paddle.float32 else out.logits.astype("float32")
            logits = as_numpy(logits)  # [sum(lengths), vocab]; a view
        outputs = Outputs(logits, hidden, self.head)
        self._fed = (m, lengths, np.cumsum(lengths) - lengths, outputs)
        self._select(lengths)
        return outputs

    def _select(self, kept: np.ndarray) -> None:
        """The next-token outputs from the fed positions: row i's after its kept[i]-th fed token."""
        _, _, starts, outputs = self._fed
        self.out = outputs.take(starts + kept - 1)  # a copy: callers may edit it (repetition penalty)

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
            self.__init__(self.model, self.pad_id, self.keep_hidden)
            return
        self._fed = None
        self.out = self.out.take(rows)
        index = paddle.to_tensor(rows)
        mask = paddle.gather(self.mask, index)
        used = np.flatnonzero(mask.numpy().any(axis=0))
        first = int(used[0]) if len(used) else 0  # columns before it are padding in every row
        self.mask = mask[:, first:] if first else mask
        self.past = [(_cut_left(paddle.gather(k, index), first), _cut_left(paddle.gather(v, index), first))
                     for k, v in self.past]


class Outputs:
    """What a forward gave some rows: `logits` [n, vocab] float32 and the final hidden states
    `hidden` [n, C] behind them (None unless kept). With a `GreedyHead` the forward skipped the
    output layer: `logits` are computed on first use, and `greedy()` (their argmax) comes from the
    hidden states without them. `greedy()` is remembered, and carried by `take`."""

    def __init__(self, logits, hidden, head):
        if logits is None and (hidden is None or head is None):
            raise ValueError("outputs without logits need the hidden states and a greedy head")
        self._logits, self.hidden, self.head, self._greedy = logits, hidden, head, None

    def __len__(self) -> int:
        return len(self._logits) if self._logits is not None else len(self.hidden)

    @property
    def logits(self) -> np.ndarray:
        if self._logits is None:
            self._logits = self.head.logits(self.hidden)
        return self._logits

    def greedy(self) -> np.ndarray:
        if self._greedy is None:
            self._greedy = (self.head.argmax(self.hidden) if self._logits is None
                            else self._logits.argmax(axis=-1).astype(np.int64))
        return self._greedy

    def take(self, rows: np.ndarray) -> "Outputs":
        taken = Outputs(None if self._logits is None else self._logits[rows],
                        None if self.hidden is None else self.hidden[rows], self.head)
        taken._greedy = None if self._greedy is None else self._greedy[rows]
        return taken

    def join(self, other: "Outputs") -> "Outputs":
        """These rows, then `other`'s."""
        if not len(self):
            return other
        both_logits = self._logits is not None and other._logits is not None
        hidden = None if self.hidden is None or other.hidden is None else np.concatenate([self.hidden, other.hidden])
        if not both_logits and hidden is None:  # cannot happen: a batch either has a head or not
            raise ValueError("joining outputs without logits needs hidden states on both sides")
        return Outputs(np.concatenate([self._logits, other._logits]) if both_logits else None, hidden,
                       self.head or other.head)


def _hidden_rows(out) -> np.ndarray | None:
    """The model output's final hidden states as float32 numpy [rows, C] (None if it has none)."""
    hidden = getattr(out, "hidden", None)
    if hidden is None:
        return None
    hidden = hidden if isinstance(hidden, np.ndarray) else hidden.astype("float32").numpy()
    return np.asarray(hidden, dtype=np.float32).reshape(-1, hidden.shape[-1])


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


def repeat_images(model, prompts, images, times: list[int]):
    """The images of prompt i repeated times[i] times, in the order of the repeated prompts."""
    if images is None:
        return None
    order, start = [], 0
    for prompt, k in zip(prompts, times):
        n = sum(1 for t in prompt if t == model.config.image_start_id)
        order.extend(list(range(start, start + n)) * k)
        start += n
    return paddle.gather(images, paddle.to_tensor(order, dtype="int64"))
