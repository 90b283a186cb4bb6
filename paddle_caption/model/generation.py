"""Batched generation with a KV cache: greedy, sampling and beam search.

Prompts of different lengths are left-padded; the attention mask is explicit and positions are
derived from it, so a row's tokens see exactly what they would see alone (batched greedy output
equals one-by-one greedy output). Images are encoded once, in the prefill. A row that emits a stop
id leaves the batch: its KV-cache rows are dropped, so finished rows cost no more compute.
Logits processing runs in NumPy on the last position only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import paddle


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


def sample_tokens(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
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
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)


class _Decoder:
    """Holds the KV cache and mask of the rows still being decoded."""

    def __init__(self, model, input_ids: np.ndarray, mask: np.ndarray, images):
        self.model = model
        self.mask = paddle.to_tensor(mask)
        out = model(paddle.to_tensor(input_ids), images=images, attention_mask=self.mask,
                    use_cache=True, last_logits_only=True)
        self.past = out.past_key_values
        self.logits = out.logits[:, -1].astype("float32").numpy()

    def keep(self, rows: np.ndarray):
        """Reorder/drop batch rows of the cache (beam reordering, finished rows leaving)."""
        index = paddle.to_tensor(rows, dtype="int64")
        self.past = [(paddle.gather(k, index), paddle.gather(v, index)) for k, v in self.past]
        self.mask = paddle.gather(self.mask, index)

    def step(self, tokens: np.ndarray):
        self.mask = paddle.concat([self.mask, paddle.ones([len(tokens), 1], dtype="int64")], axis=1)
        out = self.model(paddle.to_tensor(tokens.reshape(-1, 1)), attention_mask=self.mask,
                         past_key_values=self.past, use_cache=True, last_logits_only=True)
        self.past = out.past_key_values
        self.logits = out.logits[:, -1].astype("float32").numpy()


def generate(model, prompts: list[list[int]], images=None, config: GenerationConfig | None = None):
    """Generate a continuation for each prompt; returns new token ids per prompt (stop id excluded).

    `images` is a float tensor [n_images, 3, S, S] matched to the prompts' `<img>` spans in order.
    """
    cfg = config or GenerationConfig()
    cfg.validate()
    if cfg.stop_ids is None or cfg.pad_id is None:
        raise ValueError("GenerationConfig needs stop_ids and pad_id: use config.with_tokenizer(tokenizer)")
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            if cfg.num_beams > 1:
                return _beam_search(model, prompts, images, cfg)
            n = cfg.num_return_sequences
            if n > 1:  # n samples per prompt: each prompt (and its images) n times in one batch
                images = _repeat_images(model, prompts, images, n)
                prompts = [p for p in prompts for _ in range(n)]
            return _greedy_or_sample(model, prompts, images, cfg)
    finally:
        if was_training:
            model.train()


def _greedy_or_sample(model, prompts, images, cfg: GenerationConfig):
    rng = np.random.default_rng(cfg.seed)
    ids, mask = left_pad(prompts, cfg.pad_id)
    decoder = _Decoder(model, ids, mask, images)
    outputs = [[] for _ in prompts]
    active = np.arange(len(prompts))  # original row of each decoder row
    seen = [np.unique(np.asarray(p, dtype=np.int64)) for p in prompts]
    stop = np.array(cfg.stop_ids, dtype=np.int64)
    for step in range(cfg.max_new_tokens):
        logits = apply_repetition_penalty(decoder.logits, [seen[r] for r in active], cfg.repetition_penalty)
        tokens = sample_tokens(logits, cfg, rng) if cfg.do_sample else logits.argmax(axis=-1)
        finished = np.isin(tokens, stop)
        for row, token, done in zip(active, tokens, finished):
            if not done:
                outputs[row].append(int(token))
                if cfg.repetition_penalty != 1.0:
                    seen[row] = np.union1d(seen[row], [token])
        if finished.all() or step == cfg.max_new_tokens - 1:
            break
        if finished.any():
            still = np.flatnonzero(~finished)
            decoder.keep(still)
            active, tokens = active[still], tokens[still]
        decoder.step(tokens)
    return outputs


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
    ids, mask = left_pad(expanded, cfg.pad_id)
    images = _repeat_images(model, prompts, images, beams)
    decoder = _Decoder(model, ids, mask, images)
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
