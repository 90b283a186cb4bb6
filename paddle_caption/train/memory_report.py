"""The memory plan as text (`tools/plan_memory.py`) and as markdown rows (docs/training.md): one
column per GPU layout (1 GPU; N GPUs data parallel, stage1, stage2), GiB per GPU."""
from __future__ import annotations

from .memory_plan import GIB, RESERVE_GIB, MemoryPlan, fits


def columns(gpus: int) -> list[tuple[str, int, str]]:
    cols = [("1 GPU", 1, "dp")]
    if gpus > 1:
        cols += [(f"{gpus} GPUs DP", gpus, "dp"), (f"{gpus} GPUs stage1", gpus, "stage1"),
                 (f"{gpus} GPUs stage2", gpus, "stage2")]
    return cols


def format_report(plan: MemoryPlan, cfg, source: str, model_source: str, gpus: int, gpu_memory: float) -> str:
    g, w = plan.groups, plan.workload
    total_params = g.frozen + g.trainable
    lines = [
        f"config {source}; model {model_source}: {total_params:,} parameters",
        f"fine-tune {cfg.finetune_mode}: {g.trainable:,} trainable in {g.trainable_tensors} tensors"
        + (f" (LoRA r={cfg.lora_r} on {len(g.lora)} Linear layers)" if g.lora else "")
        + f", {g.frozen:,} frozen",
        f"dtype {cfg.dtype}; micro-batch {w.batch} x {w.seq_len} tokens (max_length), "
        f"{w.answer_tokens} supervised per sample; recompute {'on' if w.recompute else 'off'}; "
        f"attention {w.attention}; sharding in config: {cfg.sharding}",
    ]
    cols = columns(gpus)
    header = f"{'per GPU (GiB)':<32}" + "".join(f"{name:>18}" for name, _, _ in cols)
    lines += ["", header]
    tables = [plan.per_gpu(n, stage) for _, n, stage in cols]
    for label in list(plan.rows) + ["total"]:
        lines.append(f"{label:<32}" + "".join(f"{t[label] / GIB:>18.2f}" for t in tables))
    lines.append(f"{f'fits {gpu_memory:g} GiB ({RESERVE_GIB:g} reserved)':<32}"
                 + "".join(f"{'yes' if fits(t['total'], gpu_memory) else 'NO':>18}" for t in tables))
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan.activations.parts.items())
    lines += ["", f"stored activations by block (GiB): {parts or 'none (nothing trainable)'}"]
    return "\n".join(lines)


def markdown_rows(plan: MemoryPlan, name: str, gpus: int, gpu_memory: float) -> list[str]:
    out = []
    for label, n, stage in columns(gpus):
        t = plan.per_gpu(n, stage)
        out.append(
            f"| {name} | {label} | {t['weights, frozen'] / GIB:.1f} / {t['weights, trainable'] / GIB:.1f} | "
            f"{t['gradients'] / GIB:.1f} | {t['master weights (float32)'] / GIB:.1f} | "
            f"{t['AdamW moments (float32)'] / GIB:.1f} | "
            f"{(t['activations, stored'] + t['activations, backward working']) / GIB:.1f} | "
            f"{t['total'] / GIB:.1f} | {'yes' if fits(t['total'], gpu_memory) else 'no'} |")
    return out


MARKDOWN_HEADER = ("| recipe | GPUs | weights frozen / trainable | gradients | master weights | AdamW moments "
                   "| activations | total per GPU | fits {mem:g} GiB |\n|---|---|---|---|---|---|---|---|---|")
