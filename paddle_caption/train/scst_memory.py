"""What SCST adds to a memory plan (`memory_plan.py`, `objective: "scst"`, train/scst.py).

SCST (`objective: "scst"`, train/scst.py) changes the workload and adds the sampling: the
teacher-forced forward runs over B x k sampled captions (k = samples_per_image) of
prompt + max_new_tokens + 1 tokens (the prompt measured with the config's tokenizer and template),
max_new_tokens + 1 of them supervised (plus the reference batch when ce_weight > 0); before it,
without autograd, the generator holds the KV cache of those B x k rows,
layers x 2 x (prompt + max_new_tokens) x H x s bytes each, and per decoding step their float32
logits and the sampler's copies of them (4 x B x k x V x 4 bytes). Sampling's memory is released
before the forward, so the total counts the larger of the two, not both.
"""
from __future__ import annotations


def scst_workload(config, cfg) -> tuple[int, int, int, int, int]:
    """(forward batch rows, their length, supervised tokens per row, sampled rows, KV cache width)
    of one SCST micro-batch: B x k sampled captions (+ the B references when ce_weight > 0)."""
    batch = cfg.per_device_train_batch_size
    rows = batch * cfg.scst.samples_per_image
    width = prompt_tokens(config, cfg) + cfg.scst.max_new_tokens
    return (rows + (batch if cfg.scst.ce_weight else 0), min(cfg.max_length, width + 1),
            cfg.scst.max_new_tokens + 1, rows, width)


def prompt_tokens(config, cfg) -> int:
    """Length of the generation prompt (system, image span, instruction) the config's run uses."""
    from ..data.prompts import PromptTemplate
    from ..data.samples import build_prompt_ids
    from ..tokenizer import QWenVLTokenizer

    template = PromptTemplate.from_files(cfg.prompt_file, cfg.system_file)
    return len(build_prompt_ids(QWenVLTokenizer.for_model(config), template))


def scst_sampling_bytes(d: Shapes, w: Workload) -> int:
    """The generator's KV cache for the sampled rows plus the float32 logits and sampler copies."""
    if not w.sampled_rows:
        return 0
    kv = w.sampled_rows * d.layers * 2 * w.sampled_len * d.H * w.dtype_bytes
    return kv + 4 * w.sampled_rows * d.vocab * 4
