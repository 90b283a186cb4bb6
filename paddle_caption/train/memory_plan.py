"""`python tools/plan_memory.py CONFIG [CONFIG ...] [--gpus N] [--gpu_memory GiB] [--sharding S] [--key value ...]`

How much GPU memory a training config needs, per GPU, before anything is allocated: the config's
model is built lazily (`MgenVLForCausalLM.from_config(lazy=True)`: exact names and shapes, no
memory), the trainer's freezing rules (`train/freeze.py`) or LoRA's shapes (`train/lora.py`: an
[in, r] and an [r, out] matrix per adapted Linear) split it into frozen and trainable parameters,
and these formulas give the bytes (s = bytes per element of the config's `dtype`):

- weights: every parameter in `dtype` (frozen ones stay in it; LoRA adds its adapters);
- gradients: one per trainable parameter, in `dtype` (Paddle's O2 keeps gradients in the
  parameter dtype);
- master weights: a float32 copy of every trainable parameter when `dtype` is bfloat16/float16
  (AdamW `multi_precision`);
- optimizer state: AdamW's two float32 moments per trainable parameter, plus two float32
  beta-power scalars per trainable tensor;
- activations, per micro-batch of B = per_device_train_batch_size samples of T = max_length
  tokens (an upper bound: batches are padded to their longest sample) with N = B x answer_tokens
  supervised positions. Counted are the tensors autograd keeps from the forward for the backward,
  block by block, exactly as this model's code creates them (tests/test_memory_plan.py measures
  them with Paddle's allocator counters):
  * decoder layer: B·T·[(8 + 12·s)·H + 4·s·F + 8] bytes + attention. Of [B,T,H]: the inputs of
    both RMSNorms, saved upcast to float32 (2 x 4 bytes), their normalised rows and outputs (4),
    q/k/v from c_attn (3), rotate_half of q and k and the rotated k (3), the scaled q (1), the
    attention output reshaped for c_proj (1); of [B,T,F] (F = intermediate_size/2): w1, w2,
    silu(w2) and their product (4); two float32 rsqrt rows (8 bytes). Attention: "eager" keeps the
    probabilities, B·heads·T²·s (Paddle's math kernel, the CPU path); "flash" (a GPU in
    bfloat16/float16) keeps its output and log-sum-exp instead, B·T·H·s + 4·B·heads·T.
    LoRA adds, per adapted Linear, its dropout output and mask (in·(s+1) per token, when
    lora_dropout > 0) and the rank-r product (r·s per token).
  * ViT layer (P patches, width W, MLP width M): B·P·(8·W·s + 2·M·s + 16) + attention
    (B·heads·P²·s eager; B·P·W·s + 4·B·heads·P flash): the inputs and outputs of both LayerNorms
    with their mean/variance, k, v, the scaled q, the output copy, the residual; the MLP's c_fc
    output and its GELU.
  * resampler (Q queries, output width D), ln_post and proj: B·P·(5·D·s + W·s + 8) +
    B·Q·(5·D·s + 8) + B·heads·Q·P·s (eager probabilities).
  * last decoder layer, ln_f and head: the loss needs the final layer only at the N supervised
    rows (keys and values still at all T), and the head keeps its float32 softmax: N·V·4 bytes.
  * which blocks keep anything: a block keeps activations when a gradient flows into it (its
    input depends on a trainable parameter) or it has a trainable parameter itself; frozen
    layers below the first trainable one (layers 0-15 of the 16-31 recipe) keep nothing.
  * recompute (`recompute: true`): a recomputed block keeps only its input, B·T·H·s, and its full
    activations exist again only while its own backward runs. As in PaddleNLP, a block whose
    input carries no gradient (the first trainable layer above frozen ones) is not recomputed.
  * shared by the decoder layers: the RoPE cos/sin rows, B·2·(T + N/B)·rotary_dim·s, and the
    image rows the scatter keeps, B·Q·H·s.
  * backward working memory (not measured; a bound): the largest single block's activations when
    recompute is on (it is rebuilt for its backward), plus twice the largest single activation
    tensor (its gradient and the one being formed).

SCST (`objective: "scst"`): B x k sampled captions and the generator's memory (`scst_memory.py`).
Draft heads (`finetune_mode: "draft_heads"`): the heads alone train (`heads_memory.py`).
The report's text and markdown tables: `memory_report.py`.

Per GPU: data parallel replicates everything; optimizer-state sharding ("stage1", Paddle's
`group_sharded_parallel` level "os" / fleet sharding stage 1) divides master weights and AdamW
state by the GPU count; "stage2" ("os_g") divides the gradients too. A card fits the plan when
the total stays below `--gpu_memory` minus a 2 GiB reserve for the CUDA context, cuBLAS and
flash-attention workspaces and allocator fragmentation (an assumption, not a measurement).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import UserError

GIB = 1 << 30
RESERVE_GIB = 2.0
SHARDING_STAGES = ("stage1", "stage2")
SAMPLING = "SCST sampling (KV cache, logits)"


@dataclass
class ParameterGroups:
    """Parameter counts (elements) of a config's model under its fine-tune mode."""

    frozen: int = 0
    trainable: int = 0
    trainable_tensors: int = 0
    lora: dict = field(default_factory=dict)  # adapted Linear name -> (in, out)
    trainable_names: set = field(default_factory=set)
    draft_heads: tuple = ()  # draft_heads mode: (heads, blocks per head, draft vocabulary width)


@dataclass
class Shapes:
    H: int
    F: int
    heads: int
    layers: int
    vocab: int
    W: int
    M: int
    vit_heads: int
    vit_layers: int
    P: int
    D: int
    Q: int
    resampler_heads: int

    @classmethod
    def of(cls, config) -> "Shapes":
        v = config.visual
        return cls(config.hidden_size, config.intermediate_size // 2, config.num_attention_heads,
                   config.num_hidden_layers, config.vocab_size, v.width, v.mlp_width, v.heads, v.layers,
                   v.grid * v.grid, v.output_dim, v.n_queries, v.num_resampler_heads)


@dataclass
class Workload:
    batch: int  # B, per micro-batch and GPU
    seq_len: int  # T
    answer_tokens: int  # supervised positions per sample
    dtype_bytes: int  # s
    recompute: bool
    attention: str = "flash"  # "flash" (GPU bf16/fp16) or "eager" (probabilities kept)
    lora_r: int = 0
    lora_dropout: float = 0.0
    sampled_rows: int = 0  # SCST: B x k sequences the generator decodes before the forward
    sampled_len: int = 0  # SCST: prompt + max_new_tokens, the KV cache width


# ---- parameters ------------------------------------------------------------------------------------
def build_lazy_model(config, dtype: str):
    from ..model.mgen_vl import MgenVLForCausalLM

    return MgenVLForCausalLM.from_config(config, dtype=dtype, lazy=True)


def parameter_groups(model, cfg) -> ParameterGroups:
    """Frozen/trainable split by the trainer's rules (Trainer.setup_trainable): LoRA freezes the
    base and adds adapters; full trains everything but `frozen`; partial trains `trainable` minus
    `frozen`. Marks `stop_gradient` on the (lazy) model like the trainer does."""
    from .freeze import apply_freezing

    groups = ParameterGroups()
    if cfg.finetune_mode == "lora":
        from .lora import matching_linears

        for param in model.parameters():
            param.stop_gradient = True
        for name, layer in matching_linears(model, cfg.lora_target_modules):
            groups.lora[name] = tuple(layer.weight.shape)  # Paddle Linear weight: [in, out]
        trainable = set()
    elif cfg.finetune_mode == "draft_heads":  # the base frozen, only the heads train (heads_memory.py)
        from .heads_memory import count_heads

        trainable = count_heads(model, cfg.draft_heads, groups)
    else:
        patterns = ["*"] if cfg.finetune_mode == "full" else cfg.trainable
        trainable = apply_freezing(model, patterns, cfg.frozen, cfg.finetune_mode)
    for name, param in model.named_parameters():
        count = _numel(param.shape)
        if name in trainable:
            groups.trainable += count
            groups.trainable_tensors += 1
        else:
            groups.frozen += count
    for din, dout in groups.lora.values():
        groups.trainable += cfg.lora_r * (din + dout)
        groups.trainable_tensors += 2
    groups.trainable_names = trainable | {f"{name}.lora" for name in groups.lora}
    return groups


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


# ---- activations -----------------------------------------------------------------------------------
def decoder_layer_bytes(d: Shapes, w: Workload, lora_inputs: list[int]) -> int:
    s, B, T = w.dtype_bytes, w.batch, w.seq_len
    per_token = (8 + 12 * s) * d.H + 4 * s * d.F + 8
    per_token += sum(din * (s + 1) * (w.lora_dropout > 0) + w.lora_r * s for din in lora_inputs)
    return B * T * per_token + _attention_bytes(B, d.heads, T, T, d.H, s, w.attention)


def last_decoder_layer_bytes(d: Shapes, w: Workload, lora_inputs: list[int]) -> int:
    """Keys/values at all T rows; queries, attention output and MLP at the N supervised rows."""
    s, B, T, Nq = w.dtype_bytes, w.batch, w.seq_len, w.answer_tokens
    kv_side = B * T * ((4 + 2 * s) * d.H + 5 * s * d.H + 4)  # ln_1 (input, rows, output), q/k/v, RoPE of k
    q_side = B * Nq * ((4 + 2 * s) * d.H + 5 * s * d.H + 4 * s * d.F + 4)  # RoPE of q, scaled q, c_proj in, ln_2
    lora = B * T * sum(din * (s + 1) * (w.lora_dropout > 0) + w.lora_r * s for din in lora_inputs)
    return kv_side + q_side + lora + _attention_bytes(B, d.heads, Nq, T, d.H, s, w.attention)


def _attention_bytes(B, heads, q_rows, k_rows, width, s, attention: str) -> int:
    """eager: the probabilities [B, heads, q, k]; flash: its output [B, q, width] and log-sum-exp."""
    if attention == "eager":
        return B * heads * q_rows * k_rows * s
    return B * q_rows * width * s + 4 * B * heads * q_rows


def vit_layer_bytes(d: Shapes, w: Workload) -> int:
    s, B, P = w.dtype_bytes, w.batch, d.P
    return B * P * (8 * d.W * s + 2 * d.M * s + 16) + _attention_bytes(B, d.vit_heads, P, P, d.W, s, w.attention)


def resampler_bytes(d: Shapes, w: Workload) -> int:
    s, B, P, Q = w.dtype_bytes, w.batch, d.P, d.Q
    probs = B * d.resampler_heads * Q * P * s if w.attention == "eager" else B * Q * d.D * s
    return B * P * (5 * d.D * s + d.W * s + 8) + B * Q * (5 * d.D * s + 8) + probs


def head_bytes(d: Shapes, w: Workload) -> int:
    rows = w.batch * w.answer_tokens
    return rows * d.vocab * 4 + rows * d.H * (4 + 2 * w.dtype_bytes)  # float32 softmax; ln_f


@dataclass
class ActivationPlan:
    stored: int = 0
    working: int = 0
    parts: dict = field(default_factory=dict)  # name -> stored bytes


def activation_plan(config, groups: ParameterGroups, w: Workload, ablate_images: bool = False) -> ActivationPlan:
    """Bytes autograd keeps between forward and backward, block by block (module docstring)."""
    d = Shapes.of(config)
    trainable = groups.trainable_names

    def any_trainable(prefix: str) -> bool:
        return any(name.startswith(prefix) for name in trainable)

    plan = ActivationPlan()
    largest_block = 0

    def add(name: str, full: int, grad_in: bool, stores: bool, checkpoint: int):
        nonlocal largest_block
        if not stores:
            return
        recomputed = w.recompute and grad_in
        plan.parts[name] = plan.parts.get(name, 0) + (checkpoint if recomputed else full)
        largest_block = max(largest_block, full)

    visual_used = not ablate_images
    grad = False  # does a gradient flow out of what came before?
    if visual_used:
        grad = any_trainable("visual.vit.conv1") or any_trainable("visual.vit.positional_embedding") \
            or any_trainable("visual.vit.ln_pre")
        if grad:
            plan.parts["ViT stem"] = w.batch * d.P * (d.W * w.dtype_bytes + 8) + w.batch * 3 * (
                config.visual.image_size ** 2) * w.dtype_bytes
        for j in range(d.vit_layers):
            own = any_trainable(f"visual.vit.transformer.resblocks.{j}.")
            add("ViT layers", vit_layer_bytes(d, w), grad, grad or own, w.batch * d.P * d.W * w.dtype_bytes)
            grad = grad or own
        own = any_trainable("visual.attn_pool") or any_trainable("visual.ln_post") or any_trainable("visual.proj")
        if grad or own:
            plan.parts["resampler"] = resampler_bytes(d, w)
        grad = grad or own
    grad = grad or any_trainable("transformer.llm.wte")
    lora_inputs = {}
    for name, (din, _) in groups.lora.items():
        match = re.match(r"transformer\.llm\.h\.(\d+)\.", name)
        if match:
            lora_inputs.setdefault(int(match.group(1)), []).append(din)
    checkpoint = w.batch * w.seq_len * d.H * w.dtype_bytes
    if groups.trainable_names:
        # shared by every layer: the RoPE cos/sin rows, and the image rows the scatter keeps
        rotary = config.rotary_dim
        plan.parts["decoder inputs"] = w.batch * (2 * (w.seq_len + w.answer_tokens) * rotary
                                                  + (0 if ablate_images else d.Q * d.H)) * w.dtype_bytes
    for i in range(d.layers):
        own = any_trainable(f"transformer.llm.h.{i}.") or i in lora_inputs
        last = i == d.layers - 1
        full = (last_decoder_layer_bytes if last else decoder_layer_bytes)(d, w, lora_inputs.get(i, []))
        add("decoder last layer" if last else "decoder layers", full, grad, grad or own, checkpoint)
        grad = grad or own
    if grad or any_trainable("transformer.llm.ln_f") or any_trainable("lm_head"):
        plan.parts["ln_f + head"] = head_bytes(d, w)
    if groups.draft_heads:  # the base runs without autograd (heads_memory.py)
        from .heads_memory import heads_activation_bytes

        plan.parts["draft heads"] = heads_activation_bytes(d, w, groups.draft_heads)
    plan.stored = sum(plan.parts.values())
    biggest_tensor = max(w.batch * w.seq_len * d.F * w.dtype_bytes,
                         w.batch * d.heads * w.seq_len ** 2 * w.dtype_bytes if w.attention == "eager" else 0,
                         w.batch * w.answer_tokens * d.vocab * 4)
    plan.working = (largest_block if w.recompute else 0) + 2 * biggest_tensor
    return plan


# ---- per-GPU totals --------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    rows: dict  # label -> bytes, per GPU, before division
    groups: ParameterGroups
    activations: ActivationPlan
    dtype: str
    workload: Workload

    def per_gpu(self, gpus: int, stage: str) -> dict:
        """{label: bytes} on one of `gpus` GPUs under "dp" | "stage1" | "stage2"."""
        out = dict(self.rows)
        if stage in SHARDING_STAGES:
            for key in ("master weights (float32)", "AdamW moments (float32)"):
                out[key] = out[key] / gpus
        if stage == "stage2":
            out["gradients"] = out["gradients"] / gpus
        total = sum(out.values())
        if SAMPLING in out:  # released before the forward: the larger of sampling and activations counts
            total -= min(out[SAMPLING], out["activations, stored"] + out["activations, backward working"])
        out["total"] = total
        return out


def make_plan(config, cfg, answer_tokens: int | None = None, attention: str = "flash") -> MemoryPlan:
    from ..model.precision import BYTES_PER_ELEMENT

    s = BYTES_PER_ELEMENT[cfg.dtype]
    model = build_lazy_model(config, cfg.dtype)
    groups = parameter_groups(model, cfg)
    batch, seq_len = cfg.per_device_train_batch_size, cfg.max_length
    answer = answer_tokens or cfg.eval_max_new_tokens + 1
    sampled_rows = sampled_len = 0
    if cfg.objective == "scst":  # the forward runs over the B x k sampled captions (scst_memory.py)
        from .scst_memory import scst_workload

        batch, seq_len, answer, sampled_rows, sampled_len = scst_workload(config, cfg)
    w = Workload(batch=batch, seq_len=seq_len, answer_tokens=min(seq_len, answer),
                 dtype_bytes=s, recompute=cfg.recompute, attention=attention,
                 lora_r=cfg.lora_r if cfg.finetune_mode == "lora" else 0,
                 lora_dropout=cfg.lora_dropout if cfg.finetune_mode == "lora" else 0.0,
                 sampled_rows=sampled_rows, sampled_len=sampled_len)
    acts = activation_plan(config, groups, w, cfg.ablate_images)
    rows = {
        "weights, frozen": groups.frozen * s,
        "weights, trainable": groups.trainable * s,
        "gradients": groups.trainable * s,
        "master weights (float32)": groups.trainable * 4 if s < 4 else 0,
        "AdamW moments (float32)": groups.trainable * 8 + groups.trainable_tensors * 8,
        "activations, stored": acts.stored,
        "activations, backward working": acts.working,
    }
    if sampled_rows:
        from .scst_memory import scst_sampling_bytes

        rows[SAMPLING] = scst_sampling_bytes(Shapes.of(config), w)
    return MemoryPlan(rows, groups, acts, cfg.dtype, w)


# ---- report ----------------------------------------------------------------------------------------
def fits(total_bytes: float, gpu_memory_gib: float) -> bool:
    return total_bytes <= (gpu_memory_gib - RESERVE_GIB) * GIB


def load_model_config(cfg, model_config: str | None):
    """The architecture: --model_config, else the config's model_config, else MODEL_DIR/config.json."""
    from ..model.config import MgenVLConfig
    from .config import resolve_path

    path = resolve_path(model_config or cfg.model_config or cfg.model_name_or_path)
    if path is None or not Path(path).exists():
        raise UserError(f"{model_config or cfg.model_name_or_path}: model not found; pass its architecture "
                        "with --model_config (e.g. config/model/qwen-vl-chat-7b.json)")
    return MgenVLConfig.from_pretrained(path), str(path)
