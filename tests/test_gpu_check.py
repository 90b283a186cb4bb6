"""`python -m paddle_caption gpu-check`: refused without a GPU in one line; every item's code runs
here in float32 against float32 (the CPU cannot compute in bfloat16), training launched on 2 gloo
ranks as on GPUs; the tolerance judgements fail what they should."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from paddle_caption.gpu_check import checks

from .conftest import micro_model_json
from .test_train import ROOT


def test_refuses_without_a_gpu_in_one_line():
    done = subprocess.run([sys.executable, "-m", "paddle_caption", "gpu-check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpu-check needs a CUDA GPU" in lines[0] and "Paddle 3." in lines[0], done.stderr


def test_loss_comparison_passes_within_and_fails_beyond_the_tolerance():
    reference = [12.0, 11.0, 9.5]
    assert checks.compare_losses([12.1, 11.0, 9.6], reference).passed
    assert not checks.compare_losses([12.0, 11.0, 10.5], reference).passed  # 1.0 > 2% of 9.5 + 0.05
    assert not checks.compare_losses([12.0, float("nan"), 9.5], reference).passed
    assert not checks.compare_losses([12.0, 11.0], reference).passed  # a step missing


def test_attention_item_passes_in_float32_and_fails_a_wrong_kernel(monkeypatch):
    items = checks.attention("float32")
    assert [i.name for i in items] == ["attention, causal", "attention, left-padded mask", "attention, decode mask"]
    assert all(i.passed for i in items), [i.line() for i in items]
    from paddle_caption.model import attention as attention_module

    real = attention_module.F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", lambda *a, **kw: real(*a, **kw) * 1.1)
    assert not any(i.passed for i in checks.attention("float32"))


@pytest.mark.slow
def test_every_item_runs_on_cpu_in_float32_with_two_launched_ranks(tmp_path):
    from paddle_caption.gpu_check.cli import run_checks

    model_config = str(micro_model_json(tmp_path))
    lines = []
    items = run_checks(tmp_path / "work", model_config, "float32", "cpu", ["--nproc_per_node", "2"], 2,
                       log=lines.append)
    names = [i.name for i in items]
    assert names == ["environment", "attention, causal", "attention, left-padded mask", "attention, decode mask",
                     "training (2 rank(s), float32, recompute)", "training losses",
                     "prefill logits, equal-length batch", "greedy decoding, equal-length batch",
                     "prefill logits, left-padded batch", "greedy decoding, left-padded batch"], lines
    assert all(i.passed for i in items), lines
    assert lines == [i.line() for i in items] and all(line.startswith("PASS  ") for line in lines)
    # float32 against float32 over 2 ranks: data parallel equals the 1-process run's losses closely
    ours = checks.losses(tmp_path / "work/train-checked")
    assert len(ours) == checks.TRAIN_STEPS and np.isfinite(ours).all()
    assert "100% of the tokens equal" in lines[7]
