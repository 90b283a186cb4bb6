"""The KV-cache batch every decoding strategy drives (`DecodeBatch`), and left padding.

Prompts of different lengths are left-padded; the attention mask is explicit and positions are
derived from it, so a row's tokens see exactly what they would see alone (batched greedy output
equals one-by-one greedy output). Images are encoded once, in the prefill.
"""
from __future__ import annotations

import numpy as np
import paddle

from ..model.numpy_bridge import as_numpy


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
        batch.hidden                        # with keep_hidden: [rows, C] the final hidden states they
                                            # come from (draft heads read them); else None
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

    def __init__(self, model, pad_id: int, keep_hidden: bool = False):
        # keep_hidden: only a drafter that reads hidden states asks for them; otherwise no step pays
        # for copying them to the host (a device-to-host transfer per step on a GPU)
        self.model, self.pad_id, self.keep_hidden = model, pad_id, keep_hidden
        self.past = None  # per layer (k, v), each [rows, heads, width, head_dim]
        self.mask = None  # int64 [rows, width]: 1 = real token
        self.logits = np.zeros((0, 0), dtype=np.float32)
        self.hidden = None  # float32 [rows, C], row i's final hidden state behind logits[i]
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
        hidden = _hidden_rows(out) if self.keep_hidden else None
        first = len(self)
        self._fed = None
        if self.past is None:
            self.past, self.mask, self.logits, self.hidden = out.past_key_values, mask, logits, hidden
        else:
            width = max(self.width, int(mask.shape[1]))
            self.past = [(paddle.concat([_pad_left(k_old, width), _pad_left(k_new, width)], axis=0),
                          paddle.concat([_pad_left(v_old, width), _pad_left(v_new, width)], axis=0))
                         for (k_old, v_old), (k_new, v_new) in zip(self.past, out.past_key_values)]
            self.mask = paddle.concat([_pad_left(self.mask, width), _pad_left(mask, width)], axis=0)
            self.logits = np.concatenate([self.logits, logits])
            self.hidden = (None if self.hidden is None or hidden is None
                           else np.concatenate([self.hidden, hidden]))
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
        self._fed = (m, lengths, np.cumsum(lengths) - lengths, logits,
                     _hidden_rows(out) if self.keep_hidden else None)
        self._select(lengths)
        return logits

    def _select(self, kept: np.ndarray) -> None:
        """`logits` from the fed positions: row i's after its kept[i]-th fed token."""
        _, _, starts, logits, hidden = self._fed
        self.logits = logits[starts + kept - 1]  # a copy: callers may edit it (repetition penalty)
        self.hidden = None if hidden is None else hidden[starts + kept - 1]

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
        self.logits = self.logits[rows]
        self.hidden = None if self.hidden is None else self.hidden[rows]
        index = paddle.to_tensor(rows)
        mask = paddle.gather(self.mask, index)
        used = np.flatnonzero(mask.numpy().any(axis=0))
        first = int(used[0]) if len(used) else 0  # columns before it are padding in every row
        self.mask = mask[:, first:] if first else mask
        self.past = [(_cut_left(paddle.gather(k, index), first), _cut_left(paddle.gather(v, index), first))
                     for k, v in self.past]


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
