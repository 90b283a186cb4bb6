"""What a training step minimises: one registry of objectives, chosen by the config.

Every objective has `loss(train_module, batch, step) -> (loss tensor, extra metrics)` (the extras,
floats, are averaged over the logging window into the run's log) and `state_dict()` /
`set_state_dict()` for whatever a checkpoint must carry so a resumed run is bit-identical.

- `cross_entropy`: the supervised next-token loss over the caption positions (the default);
- `draft_heads` (`finetune_mode: "draft_heads"`): Medusa heads on the frozen model (draft_heads.py).
"""
from __future__ import annotations


class CrossEntropy:
    name = "cross_entropy"

    def loss(self, train_module, batch, step: int):
        return train_module(batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]), {}

    def state_dict(self) -> dict:
        return {}

    def set_state_dict(self, state: dict) -> None:
        pass


class DraftHeadsObjective(CrossEntropy):
    name = "draft_heads"

    def __init__(self, model, targets: str):
        from .draft_heads import DraftHeadsLoss

        self.heads_loss = DraftHeadsLoss(model, targets)

    def loss(self, train_module, batch, step: int):
        # the base model is frozen: its forward runs without autograd, the heads with it; the heads'
        # gradients are all-reduced with every other trainable parameter (parallel.reduce_gradients)
        return self.heads_loss(batch)


def make_objective(trainer):
    """The objective the trainer's config selects (after its model and data are built)."""
    cfg = trainer.cfg
    if cfg.finetune_mode == "draft_heads":
        from .draft_heads import attach_heads

        attach_heads(trainer.model, cfg, trainer.tokenizer, trainer.train_set.records, trainer.log)
        return DraftHeadsObjective(trainer.model, cfg.draft_heads.targets)
    return CrossEntropy()
