"""The `draft_heads` fine-tune mode: Medusa-1 heads trained on a frozen model.

Selected by `"finetune_mode": "draft_heads"` with a `"draft_heads": {...}` block (`DraftHeadsTraining`
in config.py). The run starts from a trained model directory (`model_name_or_path`); every base
parameter is frozen and only the heads (`model/draft_heads.py`) train, through the same data
pipeline, checkpoints, resume and data parallel as every other mode (the heads are a registered
sublayer `draft_heads` of the model during the run, so their parameters are the run's trainable set).

Loss: the sum over heads of each head's mean cross-entropy at the caption positions. Head k at
position p (the hidden state that predicts token p+1) learns token p+k+2, which is either

- `targets: "self"` (default; Medusa's self-distillation, teacher-forced): the base model's own
  greedy choice for that position given the reference caption before it — what verification will
  accept, so the heads learn the model rather than the references; or
- `targets: "labels"`: the reference caption's token.

Targets outside a restricted draft vocabulary are skipped (such a token can never be drafted).
`head_accuracy` reports each head's top-1/top-5 accuracy against the same targets (evaluation).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import paddle

from ..model.config import IGNORE_INDEX
from ..model.draft_heads import DraftHeadsConfig, build_heads
from ..model.head import linear_cross_entropy, project
from ..model.mgen_vl import supervised_positions

F = paddle.nn.functional
_ARGMAX_ROWS = 256  # rows per chunk of the base model's greedy choices (bounded [rows, vocab] buffer)


def draft_vocabulary(captions, tokenizer, size: int) -> list[int]:
    """The `size` most frequent token ids of the captions as the model writes them (each followed by
    its stop id), most frequent first (ties: smaller id first); the stop ids always included."""
    counts = Counter()
    for ids in tokenizer.encode_batch(list(captions)):
        counts.update(ids)
    stops = [int(t) for t in tokenizer.stop_ids]
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if t not in stops]
    return stops + ranked[:max(0, size - len(stops))]


def attach_heads(model, cfg, tokenizer, records, log=print):
    """Freeze the base model and attach fresh trainable heads (draft vocabulary from `records`'
    captions); returns the heads."""
    block = cfg.draft_heads
    vocab = draft_vocabulary((r["caption"] for r in records), tokenizer, block.draft_vocab_size) \
        if block.draft_vocab_size > 0 else []
    config = DraftHeadsConfig(hidden_size=model.config.hidden_size, num_heads=block.num_heads,
                              num_layers=block.num_layers, draft_vocab=vocab)
    for param in model.parameters():
        param.stop_gradient = True
    heads = build_heads(config, model.lm_head.weight)
    model.attach_draft_heads(heads, trainable=True)
    log(f"draft heads: {config.num_heads} head(s) x {config.num_layers} block(s), "
        + (f"draft vocabulary {len(vocab)} tokens" if vocab else "full vocabulary through lm_head")
        + f", targets {block.targets!r}; base model frozen")
    return heads


class HeadTargets:
    """Per head, the caption positions it learns at and their target ids (see the module docstring)."""

    def __init__(self, model, batch, targets: str):
        self.model = model
        labels = batch["labels"]
        labels_np = labels.numpy() if hasattr(labels, "numpy") else np.asarray(labels)
        index, next_ids = supervised_positions(labels_np)  # [B, Q]: positions and the token after each
        with paddle.no_grad():
            embeds = model.embed(_tensor(batch["input_ids"]), _tensor(batch["images"]))
            hidden, _ = model.transformer.llm(embeds, _tensor(batch["attention_mask"]),
                                              output_index=paddle.to_tensor(index))
        self.hidden = hidden.reshape([-1, hidden.shape[-1]])  # [B*Q, C], row-major over (b, q)
        valid = next_ids != IGNORE_INDEX
        wanted = self._greedy(valid) if targets == "self" else next_ids
        self.by_head = []
        rows, width = next_ids.shape
        for k in range(model.draft_heads.config.num_heads):
            ahead = k + 1  # head k at q learns what position q + k + 1 predicts
            target = np.full_like(next_ids, -1)
            if ahead < width:
                ok = (valid[:, :-ahead] & valid[:, ahead:]
                      & (index[:, ahead:] == index[:, :-ahead] + ahead))  # the same caption, contiguous
                target[:, :-ahead] = np.where(ok, wanted[:, ahead:], -1)
            self.by_head.append(target.reshape(-1))

    def _greedy(self, valid: np.ndarray) -> np.ndarray:
        """The base model's argmax at every supervised position (chunked: a [rows, vocab] buffer)."""
        flat = np.full(valid.size, -1, dtype=np.int64)
        where = np.flatnonzero(valid.reshape(-1))
        with paddle.no_grad():
            for start in range(0, len(where), _ARGMAX_ROWS):
                pick = where[start:start + _ARGMAX_ROWS]
                rows = paddle.gather(self.hidden, paddle.to_tensor(pick))
                flat[pick] = project(rows, self.model.lm_head).argmax(axis=-1).numpy()
        return flat.reshape(valid.shape)

    def head_rows(self, k: int, vocab_index: np.ndarray | None):
        """(hidden rows [n, C], targets [n] in the head's output space) for head k; n may be 0."""
        target = self.by_head[k]
        if vocab_index is not None:
            target = np.where(target >= 0, vocab_index[np.maximum(target, 0)], -1)
        keep = np.flatnonzero(target >= 0)
        if not len(keep):
            return None, None
        return paddle.gather(self.hidden, paddle.to_tensor(keep)), target[keep]


class DraftHeadsLoss:
    """loss(batch) -> (sum of the heads' mean cross-entropies, {"head{k}_top1": train accuracy})."""

    def __init__(self, model, targets: str = "self"):
        self.model, self.targets = model, targets
        heads = model.draft_heads
        self.vocab_index = None
        if heads.config.draft_vocab:  # token id -> position in the draft vocabulary (-1: outside)
            self.vocab_index = np.full(model.config.vocab_size, -1, dtype=np.int64)
            self.vocab_index[np.asarray(heads.config.draft_vocab, dtype=np.int64)] = np.arange(
                len(heads.config.draft_vocab))

    def __call__(self, batch):
        model, heads = self.model, self.model.draft_heads
        targets = HeadTargets(model, batch, self.targets)
        total, extras = None, {}
        for k in range(heads.config.num_heads):
            rows, target = targets.head_rows(k, self.vocab_index)
            if k == 0:  # how many caption positions head 0 can learn at (0: a vocabulary that misses the model)
                extras["head0_targets"] = float(0 if rows is None else len(target))
            if rows is None:
                continue
            if heads.config.draft_vocab:
                logits = heads.head_logits(k, rows)
                loss = F.cross_entropy(logits, paddle.to_tensor(target).unsqueeze(-1), reduction="mean")
                extras[f"head{k}_top1"] = float((logits.argmax(axis=-1).numpy() == target).mean())
            else:  # frozen shared lm_head: the fused numpy head on CPU (model/head.py)
                loss = linear_cross_entropy(heads.blocks[k](rows), model.lm_head, target)
            total = loss if total is None else total + loss
        if total is None:  # no caption position with a target in this batch: a zero that still has a graph
            total = sum((p * 0.0).sum() for p in heads.parameters())
        return total, extras


class DraftHeadsObjective(DraftHeadsLoss):
    """The draft_heads mode's objective (objectives.py): the base model is frozen and runs without
    autograd, the heads with it; their gradients are all-reduced with every other trainable
    parameter (parallel.reduce_gradients). No state beyond the weights."""

    def __init__(self, trainer):
        super().__init__(trainer.model, trainer.cfg.draft_heads.targets)

    def loss(self, train_module, batch, step: int):
        return self(batch)

    def state_dict(self) -> dict:
        return {}

    def set_state_dict(self, state: dict) -> None:
        pass


def head_accuracy(model, val_set, n_samples: int, batch_size: int, targets: str = "self") -> dict:
    """Top-1 / top-5 accuracy of each head on the first `n_samples` validation items, against the
    targets it trains on (a restricted vocabulary's misses count as wrong)."""
    from ..data.dataset import collate_batch

    heads = model.draft_heads
    k_heads = heads.config.num_heads
    hits1, hits5, counts = np.zeros(k_heads), np.zeros(k_heads), np.zeros(k_heads)
    vocab = np.asarray(heads.config.draft_vocab, dtype=np.int64) if heads.config.draft_vocab else None
    with paddle.no_grad():
        for start in range(0, n_samples, batch_size):
            items = [val_set[i] for i in range(start, min(n_samples, start + batch_size))]
            batch = collate_batch(items, val_set.pad_id)
            head_targets = HeadTargets(model, batch, targets)
            for k in range(k_heads):
                target = head_targets.by_head[k]
                keep = np.flatnonzero(target >= 0)
                if not len(keep):
                    continue
                rows = paddle.gather(head_targets.hidden, paddle.to_tensor(keep))
                features = heads.blocks[k](rows)
                logits = (heads.proj[k](features) if vocab is not None else project(features, model.lm_head)).numpy()
                top5 = np.argsort(-logits, axis=1)[:, :5]
                top5 = vocab[top5] if vocab is not None else top5
                hits1[k] += (top5[:, 0] == target[keep]).sum()
                hits5[k] += (top5 == target[keep][:, None]).any(axis=1).sum()
                counts[k] += len(keep)
    out = {}
    for k in range(k_heads):
        out[f"head{k}_top1"] = float(hits1[k] / counts[k]) if counts[k] else float("nan")
        out[f"head{k}_top5"] = float(hits5[k] / counts[k]) if counts[k] else float("nan")
    return out


def _tensor(value):
    return value if isinstance(value, paddle.Tensor) else paddle.to_tensor(np.asarray(value))
