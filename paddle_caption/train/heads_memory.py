"""What the draft_heads mode trains, for a memory plan (`memory_plan.py`, train/draft_heads.py).

Every base parameter is frozen (its weights still count, in `dtype`); the heads train: per head,
`num_layers` residual blocks (hidden x hidden + hidden) and a [hidden, N] projection onto the draft
vocabulary (none when N = 0: the shared, frozen lm_head). The base forward runs without autograd,
so it keeps no activations; each head keeps its blocks' inputs (2 per block, [N_sup, hidden]) and
its float32 logits over N (or the vocabulary) at the N_sup supervised positions.
"""
from __future__ import annotations


def count_heads(model, block, groups) -> set:
    """Freeze the (lazy) model, add the heads' parameter counts to `groups`; returns the base's
    trainable names (none)."""
    for param in model.parameters():
        param.stop_gradient = True
    width = min(block.draft_vocab_size, model.config.vocab_size)
    groups.draft_heads = (block.num_heads, block.num_layers, width)
    hidden = model.config.hidden_size
    groups.trainable += block.num_heads * (block.num_layers * (hidden * hidden + hidden) + hidden * width)
    groups.trainable_tensors += block.num_heads * (2 * block.num_layers + (1 if width else 0))
    return set()


def heads_activation_bytes(d, w, heads: tuple) -> int:
    count, blocks, width = heads
    return w.batch * w.answer_tokens * count * (2 * blocks * d.H * w.dtype_bytes + (width or d.vocab) * 4)
