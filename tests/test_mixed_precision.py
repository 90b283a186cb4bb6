"""bfloat16/float16 training (Paddle's O2) as far as a CPU can check it.

Paddle's CPU build has no bfloat16/float16 matmul or AdamW kernel, so no low-precision step runs
here. What runs: the trainer's whole set-up in bfloat16/float16 (model, LoRA, optimizer), the
optimizer's O2 bookkeeping (float32 master weights for exactly the trainable parameters, created
without a step by `_create_accumulators`, as tests/test_memory_plan.py does), checkpoints of it all
bit for bit through the trainer's own save and resume, the float16 loss scaler's state, and the
one-line refusal of a low-precision config on a CPU. Arithmetic in bfloat16/float16, loss-scaling
dynamics and flash attention are left to a GPU.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from paddle_caption.runtime import UserError, run_cli
from paddle_caption.train import run_checkpoints as ckpt
from paddle_caption.train.config import TrainConfig

from .conftest import micro_model_json
from .test_train import base_config, write_config

PARTIAL = dict(finetune_mode="partial", trainable=["transformer.llm.h.1.*", "lm_head.*"])
LORA = dict(finetune_mode="lora", lora_r=4, lora_alpha=8)


def low_config(tmp_path, caption_data, dtype, **overrides) -> dict:
    values = dict(dtype=dtype, model_config=str(micro_model_json(tmp_path, num_hidden_layers=2)), **PARTIAL)
    return base_config(tmp_path, caption_data, **{**values, **overrides})


def pretrained_config(tmp_path, caption_data, dtype, **overrides) -> dict:
    """Fine-tuning a pretrained model directory (float32 on disk), the recipes' case: it loads
    straight into `dtype`. (A from-scratch float16 model cannot even be initialised on a CPU: Paddle
    has no float16 random-initialiser kernels there.)"""
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    arch = micro_model_json(tmp_path, num_hidden_layers=2)
    paddle.seed(7)
    MgenVLForCausalLM.from_config(MgenVLConfig.from_pretrained(arch)).save_pretrained(tmp_path / "base")
    return low_config(tmp_path, caption_data, dtype, model_config=None,
                      model_name_or_path=str(tmp_path / "base"), **overrides)


def set_up(cfg: dict):
    """A trainer after `setup()` (everything before the first step), on this CPU."""
    from paddle_caption.train.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(cfg).validate(), log=lambda *_: None)
    trainer.setup()
    return trainer


def create_optimizer_state(trainer) -> None:
    """What the first step would create: moments, beta powers and master weights."""
    params = [p for _, p in trainer.named_trainable]
    trainer.optimizer._create_accumulators(paddle.static.default_main_program().global_block(), params)


def raw(tensor) -> np.ndarray:
    """The tensor's bits (bfloat16 comes out of Paddle as uint16) with its dtype."""
    return np.asarray(tensor.numpy())


@pytest.fixture
def gpu_scaler(monkeypatch):
    """Paddle's GradScaler disables itself on a CPU (it 'makes no effect'); for the checkpoint round
    trip the scaler is built as on a GPU: its constructor sees a GPU place, nothing else does."""
    from paddle.amp import grad_scaler

    place = SimpleNamespace(is_gpu_place=lambda: True, is_xpu_place=lambda: False,
                            is_custom_place=lambda: False)
    monkeypatch.setattr(grad_scaler, "_dygraph_tracer", lambda: SimpleNamespace(_expected_place=place))


# ------------------------------------------------------------------------------- refused on a CPU
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_low_precision_config_on_cpu_stops_in_one_line_before_loading(tmp_path, caption_data, capsys, dtype):
    from paddle_caption.train.cli import main

    cfg = low_config(tmp_path, caption_data, dtype)
    assert run_cli(main, [str(write_config(tmp_path / "c.json", **cfg))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config dtype {dtype}" in err and "on CPU use float32" in err, err
    assert not (tmp_path / "run").exists()  # nothing was set up


# --------------------------------------------------------------------------- the trainer's set-up
@pytest.mark.parametrize("mode", [PARTIAL, LORA], ids=["partial", "lora"])
def test_the_trainer_builds_bfloat16_and_keeps_float32_masters_for_exactly_the_trainable(
        tmp_path, caption_data, mode):
    cfg = low_config(tmp_path, caption_data, "bfloat16", recompute=True, **mode)
    trainer = set_up(cfg)
    params = dict(trainer.model.named_parameters())
    assert {str(p.dtype) for p in params.values()} == {"paddle.bfloat16"}  # frozen ones and adapters too
    assert trainer.base_model.transformer.llm.recompute  # on the base model, also under LoRA
    trainable = dict(trainer.named_trainable)
    assert trainable and len(trainable) < len(params)
    if cfg["finetune_mode"] == "lora":
        assert all("lora_" in name for name in trainable)

    optimizer = trainer.optimizer
    assert optimizer._multi_precision
    create_optimizer_state(trainer)
    masters = optimizer._master_weights
    assert set(masters) == {p.name for p in trainable.values()}
    for name, param in trainable.items():
        master = masters[param.name]
        assert master.dtype == paddle.float32 and master.shape == param.shape
        np.testing.assert_array_equal(master.numpy(), param.astype("float32").numpy(), err_msg=name)
    state = ckpt.optimizer_state(optimizer, trainer.named_trainable)
    owners = {key.split("::")[0] for key in state}
    assert owners == set(trainable)  # no state at all for a frozen parameter
    assert {str(t.dtype) for t in state.values()} == {"paddle.float32"}
    assert {key.split("::")[1] for key in state} == {
        "master_weights", "moment1_0", "moment2_0", "beta1_pow_acc_0", "beta2_pow_acc_0"}


def test_float32_training_has_no_master_weights_and_no_scaler(tmp_path, caption_data):
    trainer = set_up(low_config(tmp_path, caption_data, "float32"))
    assert {str(p.dtype) for p in trainer.model.parameters()} == {"paddle.float32"}
    create_optimizer_state(trainer)
    assert not trainer.optimizer._master_weights and trainer.precision.scaler is None


# ------------------------------------------------------------------------- checkpoints, bit for bit
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_checkpoints_round_trip_low_precision_weights_master_weights_moments_and_scaler(
        tmp_path, caption_data, gpu_scaler, dtype):
    from paddle_caption.model.weights_io import load_safetensors
    from paddle_caption.train.config import config_fingerprint
    from paddle_caption.train.trainer import LoopState

    cfg = pretrained_config(tmp_path, caption_data, dtype)
    first = set_up(cfg)
    create_optimizer_state(first)
    # Give every saved value something a fresh run could not reproduce by accident: trained weights,
    # master weights that differ from the weights they shadow, moments, and a scaler mid-run.
    rng = np.random.default_rng(0)
    for _, param in first.named_trainable:
        param.set_value(paddle.to_tensor(rng.normal(size=param.shape).astype("float32")).astype(dtype))
    for tensor in ckpt.optimizer_state(first.optimizer, first.named_trainable).values():
        tensor.set_value(paddle.to_tensor(rng.normal(size=tensor.shape).astype("float32")))
    scaler = first.precision.scaler
    if dtype == "float16":
        assert scaler is not None and scaler.is_enable()
        scaler.load_state_dict({"scale": np.asarray([1234.567], np.float32), "incr_ratio": 3.0,
                                "decr_ratio": 0.25, "incr_every_n_steps": 17, "decr_every_n_nan_or_inf": 2,
                                "incr_count": 5, "decr_count": 1, "use_dynamic_loss_scaling": True})
    else:
        assert scaler is None  # bfloat16 needs no loss scaling
    state = LoopState(step=3, config_fingerprint=config_fingerprint(first.cfg))
    saved = first.save_checkpoint(state)

    local = load_safetensors(saved / ckpt.LOCAL_PARAMS)
    assert {str(t.dtype) for t in local.values()} == {f"paddle.{dtype}"}
    assert (saved / ckpt.SCALER_STATE).is_file() == (dtype == "float16")

    second = set_up(cfg)  # a fresh process's view: new parameter objects, a new optimizer
    assert second.maybe_resume(LoopState(config_fingerprint=state.config_fingerprint)) == str(saved)
    create_optimizer_state(second)  # the first step creates the accumulators from the loaded state
    before, after = dict(first.model.named_parameters()), dict(second.model.named_parameters())
    for name, param in before.items():  # trained ones as saved, frozen ones as initialised
        assert after[name].dtype == param.dtype
        np.testing.assert_array_equal(raw(after[name]), raw(param), err_msg=name)
    expected = ckpt.optimizer_state(first.optimizer, first.named_trainable)
    got = ckpt.optimizer_state(second.optimizer, second.named_trainable)
    assert got.keys() == expected.keys() and any(k.endswith("::master_weights") for k in got)
    for key, tensor in expected.items():
        np.testing.assert_array_equal(raw(got[key]), raw(tensor), err_msg=key)
    if dtype == "float16":
        a, b = scaler.state_dict(), second.precision.scaler.state_dict()
        assert a.keys() == b.keys() and a.pop("scale").tobytes() == b.pop("scale").tobytes() and a == b

        (saved / ckpt.SCALER_STATE).unlink()
        with pytest.raises(UserError, match="scaler.json: missing"):
            set_up(cfg).maybe_resume(LoopState(config_fingerprint=state.config_fingerprint))


def test_a_corrupt_scaler_state_is_named(tmp_path, gpu_scaler):
    scaler = paddle.amp.GradScaler()
    with pytest.raises(UserError, match="s.json: not a loss-scaler state"):
        ckpt.set_scaler_state(scaler, {"scale": [2.0]}, "s.json")
    state = ckpt.scaler_state(scaler)
    assert json.loads(json.dumps(state)) == state  # plain JSON
