"""The gpu-check's items. Each compares the dtype under test (bfloat16 on a GPU) with a float32
reference and returns `Item`s; on a CPU the same code runs float32 against float32 (tests).

Tolerances (stated in the report; set from bfloat16's 8-bit mantissa, a relative step of 2^-8 ≈
0.4% per rounding, not yet calibrated on a GPU):
- attention: max |out - float32 reference| <= 2e-2 on N(0, 1) inputs (the fused kernel, causal,
  a left-padding mask, and a one-query decode mask);
- training: every step's loss within 2% + 0.05 of the float32 run's, and finite;
- decoding: prefill logits within 5% of the float32 logits' largest magnitude, for an equal-length
  batch and a left-padded one; greedy decoding of both batches runs to max_new_tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ATTENTION_TOL = 2e-2
LOSS_REL_TOL, LOSS_ABS_TOL = 0.02, 0.05
LOGITS_REL_TOL = 5e-2
TRAIN_STEPS = 6


@dataclass
class Item:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


def versions() -> str:
    import paddle

    cuda = paddle.version.cuda() if paddle.is_compiled_with_cuda() else "none"
    cudnn = paddle.version.cudnn() if paddle.is_compiled_with_cuda() else "none"
    return f"Paddle {paddle.__version__} (commit {paddle.version.commit[:10]}), CUDA {cuda}, cuDNN {cudnn}"


def gpu_count() -> int:
    import paddle

    if not paddle.is_compiled_with_cuda():
        return 0
    return paddle.device.cuda.device_count()


def environment(dtype: str) -> Item:
    """The visible GPUs; bfloat16 needs compute capability 8.0 or newer (A100, H100, ...)."""
    import paddle

    n = gpu_count()
    if n == 0:
        return Item("environment", True, f"{versions()}; CPU (no GPU: the items run in {dtype})")
    names = []
    ok = True
    for i in range(n):
        major, minor = paddle.device.cuda.get_device_capability(i)
        names.append(f"{paddle.device.cuda.get_device_name(i)} (sm{major}{minor})")
        ok &= dtype != "bfloat16" or major >= 8
    return Item("environment", ok, f"{versions()}; {n} GPU(s): " + ", ".join(names)
                + ("" if ok else "; bfloat16 needs compute capability >= 8.0"))


def max_diff(ours, reference) -> float:
    return float(np.abs(np.asarray(ours, dtype=np.float32) - np.asarray(reference, dtype=np.float32)).max())


def attention(dtype: str) -> list[Item]:
    """The kit's one fused-attention call (flash attention on a GPU in bfloat16), against the plain
    float32 expression, for the three masks the model builds."""
    import paddle

    from ..model.attention import MASK_VALUE, fused_attention, plain_attention

    rng = np.random.default_rng(0)
    b, h, d = 2, 4, 64
    items = []
    for case, q_len, k_len in (("causal", 64, 64), ("left-padded mask", 64, 64), ("decode mask", 1, 80)):
        q, k, v = (rng.standard_normal((b, h, n, d)).astype(np.float32) for n in (q_len, k_len, k_len))
        allowed = np.tril(np.ones((q_len, k_len), dtype=bool), k=k_len - q_len)[None].repeat(b, 0)
        if case != "causal":
            allowed[1, :, :5] = False  # row 1 is left-padded by 5
            allowed[1, :, -1] = True
        bias = np.where(allowed, 0.0, MASK_VALUE).astype(np.float32)[:, None]
        reference = plain_attention(*map(paddle.to_tensor, (q, k, v)), d ** -0.5,
                                    paddle.to_tensor(bias)).numpy()
        low = [paddle.to_tensor(t).astype(dtype) for t in (q, k, v)]
        causal = case == "causal"
        out = fused_attention(*low, d ** -0.5, None if causal else paddle.to_tensor(bias), causal=causal)
        diff = max_diff(out.astype("float32").numpy(), reference)
        items.append(Item(f"attention, {case}", bool(diff <= ATTENTION_TOL),
                          f"max |diff| {diff:.2e} vs float32 (tolerance {ATTENTION_TOL:g})"))
    return items


# ------------------------------------------------------------------------------------- training
def make_data(workdir: Path) -> Path:
    from ..data.convert import RunOptions, convert
    from ..data.synthetic import write_dataset

    records = workdir / "train" / "records.jsonl"
    if not records.is_file():
        write_dataset(workdir / "tsv", 64, 4, 4, seed=0, workers=1, progress=False)
        convert(workdir / "tsv" / "train.tsv", workdir / "train", opts=RunOptions(workers=1, progress=False))
    return records


def train_config(workdir: Path, name: str, model_config: str, records: Path, dtype: str, accumulation: int) -> Path:
    """The shipped recipes' settings on the tiny architecture: full fine-tuning, recompute, O2 in
    `dtype`, AdamW with clipping."""
    cfg = {"model_config": model_config, "train_records": str(records), "finetune_mode": "full",
           "dtype": dtype, "recompute": True, "per_device_train_batch_size": 4,
           "gradient_accumulation_steps": accumulation, "max_steps": TRAIN_STEPS, "learning_rate": 1e-3,
           "warmup_ratio": 0.0, "max_grad_norm": 1.0, "logging_steps": 1, "num_workers": 0,
           "progress": False, "output_dir": str(workdir / name)}
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def launch_training(config: Path, launch_args: list[str], log_dir: Path, timeout: float = 600) -> None:
    script = Path(__file__).with_name("launched_train.py")
    command = [sys.executable, *(["-m", "paddle.distributed.launch", *launch_args, "--log_dir", str(log_dir)]
                                 if launch_args else []), str(script), str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if done.returncode != 0:
        logs = "".join(p.read_text(errors="replace")[-1500:] for p in sorted(log_dir.glob("workerlog.*")))
        raise RuntimeError(f"training failed ({' '.join(command)}): {(done.stderr + logs)[-3000:]}")


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


def compare_losses(ours: list[float], reference: list[float]) -> Item:
    """Every step's loss finite and within LOSS_REL_TOL * |reference| + LOSS_ABS_TOL."""
    if len(ours) != len(reference) or not ours:
        return Item("training losses", False, f"{len(ours)} logged steps vs {len(reference)} in the float32 run")
    worst = max(abs(a - b) - (LOSS_REL_TOL * abs(b) + LOSS_ABS_TOL) for a, b in zip(ours, reference))
    finite = all(np.isfinite(ours))
    return Item("training losses", finite and worst <= 0, f"{len(ours)} steps, loss {ours[0]:.3f} -> {ours[-1]:.3f} "
                f"(float32 {reference[0]:.3f} -> {reference[-1]:.3f}); tolerance {LOSS_REL_TOL:.0%} + {LOSS_ABS_TOL:g}"
                + ("" if finite else "; non-finite loss"))


def training(workdir: Path, model_config: str, dtype: str, launch_args: list[str], ranks: int) -> tuple[list[Item], Path]:
    """Data parallel over `ranks` processes in `dtype` (the launcher's `launch_args`), and the same
    config in float32 in one process with `ranks` times the accumulation. Returns the items and the
    float32 run's directory."""
    records = make_data(workdir)
    low = train_config(workdir, "train-checked", model_config, records, dtype, 1)
    ref = train_config(workdir, "train-reference", model_config, records, "float32", ranks)
    launch_training(low, launch_args, workdir / "logs-checked")
    launch_training(ref, [], workdir / "logs-reference")
    ours, reference = losses(workdir / "train-checked"), losses(workdir / "train-reference")
    o2 = ", O2" if dtype != "float32" else ""  # float32 trains without autocast, as on a CPU
    return [Item(f"training ({ranks} rank(s), {dtype}{o2}, recompute)", True,
                 f"{TRAIN_STEPS} steps ran"), compare_losses(ours, reference)], workdir / "train-reference"


# ------------------------------------------------------------------------------------- decoding
def trained_model_dir(run_dir: Path, model_config: str) -> Path:
    """The float32 run's final weights as a model directory."""
    from ..model.weights_io import load_safetensors
    from ..model.config import MgenVLConfig
    from ..model.mgen_vl import MgenVLForCausalLM

    out = run_dir / "model"
    if not (out / "config.json").is_file():
        model = MgenVLForCausalLM(MgenVLConfig.from_pretrained(model_config))
        state = model.state_dict()  # full fine-tuning trains all but the resampler's fixed table
        state.update(load_safetensors(run_dir / "final" / "local_params.safetensors"))
        model.set_state_dict(state)
        model.save_pretrained(out)
    return out


def decode_prompts(config, equal: bool):
    """Image prompts of one length (the captioning case) or of three lengths (left padding)."""
    import paddle

    rng = np.random.default_rng(1)
    span = [config.image_start_id] + [config.image_pad_id] * config.visual.n_queries + [config.image_end_id]
    shapes = [(4, 6)] * 4 if equal else [(4, 6), (1, 2), (9, 3)]
    prompts = [list(rng.integers(100, 20000, n)) + span + list(rng.integers(100, 20000, m)) for n, m in shapes]
    size = config.visual.image_size
    images = paddle.to_tensor(rng.standard_normal((len(prompts), 3, size, size)).astype("float32"))
    return prompts, images


def prefill_logits(model, prompts, images) -> np.ndarray:
    import paddle

    from ..decoding.batch import left_pad

    ids, mask = left_pad(prompts, 0)
    with paddle.no_grad():
        out = model(paddle.to_tensor(ids), images=images,
                    attention_mask=paddle.to_tensor(mask), last_logits_only=True)
    return out.logits[:, -1].astype("float32").numpy()


def decoding(model_dir: Path, dtype: str, new_tokens: int = 12) -> list[Item]:
    from ..decoding.config import GenerationConfig
    from ..decoding.generate import generate
    from ..model.mgen_vl import MgenVLForCausalLM

    reference = MgenVLForCausalLM.from_pretrained(model_dir, dtype="float32")
    ours = MgenVLForCausalLM.from_pretrained(model_dir, dtype=dtype)
    reference.eval()
    ours.eval()
    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_ids=(), pad_id=0)
    items = []
    for equal in (True, False):
        case = "equal-length batch" if equal else "left-padded batch"
        prompts, images = decode_prompts(reference.config, equal)
        expected = prefill_logits(reference, prompts, images)
        got = prefill_logits(ours, prompts, images)
        rel = max_diff(got, expected) / max(1e-6, float(np.abs(expected).max()))
        items.append(Item(f"prefill logits, {case}", bool(rel <= LOGITS_REL_TOL),
                          f"max |diff| {rel:.2%} of the largest float32 logit (tolerance {LOGITS_REL_TOL:.0%})"))
        tokens = generate(ours, prompts, images, cfg)
        reference_tokens = generate(reference, prompts, images, cfg)
        complete = all(len(t) == new_tokens for t in tokens)
        agree = np.mean([a == b for t, r in zip(tokens, reference_tokens) for a, b in zip(t, r)])
        items.append(Item(f"greedy decoding, {case}", complete,
                          f"{len(prompts)} rows x {new_tokens} tokens in {dtype}; {agree:.0%} of the tokens equal "
                          "float32's (reported, not judged: near-ties may flip)"))
    return items
