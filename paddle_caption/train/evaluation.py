"""Evaluation during training: validation loss, then captions of a fixed validation subset, scored.

Captions come from the same Predictor as `predict_batch.py` (same prompt ids, generation and
caption cleaning), so a score logged during training is the score the merged model gets. Which
extra scores are computed is the config's choice (`eval_extra_scores`, see eval/scorers.py).
"""
from __future__ import annotations

import time


from ..model.config import IGNORE_INDEX


def validation_loss(model, val_set, n_samples: int, batch_size: int) -> float:
    """Token-weighted mean loss over the first `n_samples` validation items."""
    import paddle

    from ..data.dataset import collate_batch

    total, tokens = 0.0, 0
    with paddle.no_grad():
        for start in range(0, n_samples, batch_size):
            items = [val_set[i] for i in range(start, min(n_samples, start + batch_size))]
            batch = collate_batch(items, val_set.pad_id)
            out = model(paddle.to_tensor(batch["input_ids"]), images=paddle.to_tensor(batch["images"]),
                        attention_mask=paddle.to_tensor(batch["attention_mask"]),
                        labels=paddle.to_tensor(batch["labels"]))
            n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(out.loss) * n_tokens
            tokens += n_tokens
    return total / max(1, tokens)


def caption_scores(predictor, val_set, n_samples: int, batch_size: int, extra: list[str]) -> dict:
    """Greedy captions of the first `n_samples` validation images, scored against their captions."""
    from ..eval.caption_scores import score_captions
    from ..eval.scorers import extra_scores

    predictions, references = {}, {}
    for start in range(0, n_samples, batch_size):
        index = list(range(start, min(n_samples, start + batch_size)))
        captions = predictor.caption_batch([val_set.load_image(i) for i in index])
        for i, caption in zip(index, captions):
            record = val_set.records[i]
            predictions[str(record["id"])] = caption
            references[str(record["id"])] = [str(record["caption"])]
    scores = {k: v for k, v in score_captions(predictions, references).items() if k != "n"}
    scores.update(extra_scores(extra, predictions, references))
    return scores


def evaluate(model, predictor, val_set, cfg) -> dict:
    """{"val_loss", caption scores..., "eval_seconds"} with the model in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    start = time.time()
    try:
        record = {"val_loss": validation_loss(model, val_set, min(cfg.eval_loss_samples, len(val_set)),
                                              cfg.eval_batch_size)}
        if cfg.finetune_mode == "draft_heads":  # each head's accuracy on the targets it learns
            from .draft_heads import head_accuracy

            record.update(head_accuracy(model, val_set, min(cfg.eval_loss_samples, len(val_set)),
                                        cfg.eval_batch_size, cfg.draft_heads.targets))
        n_captions = min(cfg.eval_caption_samples, len(val_set))
        if n_captions:
            record.update(caption_scores(predictor, val_set, n_captions, cfg.eval_batch_size,
                                         cfg.eval_extra_scores))
    finally:
        if was_training:
            model.train()
    record["eval_seconds"] = round(time.time() - start, 2)
    return record


