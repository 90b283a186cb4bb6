"""LoRA training (paddlenlp.peft) and tools/merge_local_params.py: merged model == trained model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paddle_caption.data.dataset import collate_batch
from paddle_caption.runtime import UserError, run_cli
from paddle_caption.train.merge import merge

from .conftest import micro_model_json
from .test_train import base_config, state_of, train

ROOT = Path(__file__).resolve().parents[1]


def logits_of(model, trainer, n=3) -> np.ndarray:
    """Full-sequence logits (with images) of the first n training samples, in eval mode."""
    import paddle
    batch = collate_batch([trainer.train_set[i] for i in range(n)], trainer.train_set.pad_id)
    model.eval()
    with paddle.no_grad():
        out = model(input_ids=paddle.to_tensor(batch["input_ids"]), images=paddle.to_tensor(batch["images"]),
                    attention_mask=paddle.to_tensor(batch["attention_mask"]))
    return out.logits.numpy()


def load_merged(path: Path):
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    return MgenVLForCausalLM.from_pretrained(path)


def lora_config(tmp_path, caption_data, **overrides):
    values = dict(finetune_mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.05, learning_rate=1e-2,
                  max_steps=3, model_config=str(micro_model_json(tmp_path, num_hidden_layers=2)))
    return base_config(tmp_path, caption_data, **{**values, **overrides})


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_trains_only_adapters_and_merge_equals_adapted_model(tmp_path, caption_data):
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    import paddle
    cfg = lora_config(tmp_path, caption_data)
    trainer, _ = train(cfg)
    wrapped = trainer.model
    trained = {n: p for n, p in wrapped.named_parameters() if not p.stop_gradient}
    assert trained and all("lora_" in n for n in trained), sorted(trained)[:4]
    assert {n.split(".")[-1] for n in trained} == {"lora_A", "lora_B"}
    assert len(trained) == 2 * 4 * 2  # (A, B) x 4 target kinds x 2 layers

    # Every base parameter is bit-identical to the seeded initialisation; every lora_B has moved
    # (it starts at zero, so a nonzero B proves the adapter trained).
    config = MgenVLConfig.from_pretrained(cfg["model_config"])
    paddle.seed(trainer.cfg.init_seed)
    start = state_of(MgenVLForCausalLM(config))
    after = {n.removeprefix("model."): v for n, v in state_of(wrapped).items()}
    for name, value in start.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    for name, param in trained.items():
        if name.endswith("lora_B"):
            assert np.abs(param.numpy()).max() > 0, name

    adapted = logits_of(wrapped, trainer)
    lora_dir = tmp_path / "run" / "final" / "lora"
    assert sorted(p.name for p in lora_dir.iterdir()) == [
        "lora_config.json", "peft_model.safetensors", "peft_model.safetensors.index.json"]

    out = merge(cfg["model_config"], tmp_path / "merged", lora_path=str(tmp_path / "run"), log=lambda *_: None)
    merged_model = load_merged(out)
    assert not [k for k in merged_model.state_dict() if "lora" in k]
    np.testing.assert_allclose(logits_of(merged_model, trainer), adapted, rtol=1e-4, atol=1e-4)
    # The merge really changed the weights (the test is not passing on an unadapted model).
    assert np.abs(logits_of(MgenVLForCausalLM(config), trainer) - adapted).max() > 1e-3

    # PaddleNLP itself reads our safetensors adapter directory.
    from paddlenlp.peft import LoRAModel

    paddle.seed(trainer.cfg.init_seed)
    base = MgenVLForCausalLM(config)
    base.config.tensor_parallel_degree, base.config.tensor_parallel_rank = 1, 0
    reloaded = LoRAModel.from_pretrained(base, str(lora_dir))
    np.testing.assert_allclose(logits_of(reloaded, trainer), adapted, rtol=1e-5, atol=1e-5)


def test_lora_target_matching_nothing_is_refused(tmp_path, caption_data):
    cfg = lora_config(tmp_path, caption_data, lora_target_modules=[r"transformer\.llm\.h\.\d+\.mlp\.nope"])
    with pytest.raises(UserError, match="mlp.*nope.*matches no layer"):
        train(cfg)


# ------------------------------------------------------------------------------- local-params merge
def test_local_merge_equals_trained_model_via_cli(tmp_path, caption_data):
    cfg = base_config(tmp_path, caption_data, finetune_mode="partial",
                      trainable=["transformer.llm.h.0.*", "lm_head.*"], max_steps=2)
    trainer, _ = train(cfg)
    expected = logits_of(trainer.model, trainer)
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "tools/merge_local_params.py", "--model_name_or_path",
                           cfg["model_config"], "--local_path", str(tmp_path / "run"),
                           "--merge_model_path", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "merged local checkpoint" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    for name in ("config.json", "model.safetensors", "prompt.json", "train_config.json", "merge_info.json"):
        assert name in names
    assert not list(tmp_path.glob(".merged*"))
    info = json.loads((out / "merge_info.json").read_text())
    assert info["step"] == 2 and info["params_replaced"] == len(trainer.named_trainable)
    np.testing.assert_array_equal(logits_of(load_merged(out), trainer), expected)

    # Merging into another base of the same architecture (here: another random initialisation)
    # takes exactly the checkpoint's trained parameters and keeps that base's others; a second merge
    # into the same output directory replaces it.
    import paddle

    from paddle_caption.model.weights_io import load_safetensors
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(123)
    other = MgenVLForCausalLM(MgenVLConfig.from_pretrained(cfg["model_config"]))
    other.save_pretrained(tmp_path / "other")
    other_state = state_of(other)
    local = {k: v.numpy() for k, v in load_safetensors(tmp_path / "run" / "final" / "local_params.safetensors").items()}
    assert set(local) == {name for name, _ in trainer.named_trainable}
    merge(str(tmp_path / "other"), out, local_path=str(tmp_path / "run" / "final"), log=lambda *_: None)
    merged = state_of(load_merged(out))
    assert set(merged) == set(other_state) and set(local) < set(merged)
    for name, value in merged.items():
        np.testing.assert_array_equal(value, local[name] if name in local else other_state[name], err_msg=name)
    assert any(not np.array_equal(other_state[name], local[name]) for name in local)


def test_merge_refuses_other_architectures_and_foreign_outputs(tmp_path, caption_data):
    from paddle_caption.model.weights_io import load_safetensors, save_safetensors
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    cfg = base_config(tmp_path, caption_data, max_steps=1)
    train(cfg)
    ckpt = tmp_path / "run" / "final"
    wider = MgenVLForCausalLM(MgenVLConfig.from_pretrained(micro_model_json(tmp_path, intermediate_size=128)))
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(UserError, match="different architecture: config 'intermediate_size'"):
        merge(str(tmp_path / "wider"), tmp_path / "m1", local_path=str(ckpt))

    # Without the saved config, the key/shape check still names the first mismatching tensor.
    (ckpt / "model_config.json").unlink()
    with pytest.raises(UserError, match=r"key '.*' has shape \["):
        merge(str(tmp_path / "wider"), tmp_path / "m1", local_path=str(ckpt))
    local = load_safetensors(ckpt / "local_params.safetensors")
    local["transformer.llm.h.9.mlp.w1.weight"] = next(iter(local.values()))
    save_safetensors(local, ckpt / "local_params.safetensors")
    with pytest.raises(UserError, match=r"unexpected key 'transformer\.llm\.h\.9\.mlp\.w1\.weight'"):
        merge(cfg["model_config"], tmp_path / "m2", local_path=str(ckpt))

    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier merge output"):
        merge(cfg["model_config"], tmp_path / "precious", local_path=str(ckpt))
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no complete checkpoint here"):
        merge(cfg["model_config"], tmp_path / "m3", local_path=str(tmp_path / "empty"))


def test_merge_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "tools/merge_local_params.py", "--model_name_or_path", "x.json",
                           "--local_path", str(tmp_path / "missing"), "--merge_model_path",
                           str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr, proc.stderr


def test_lora_run_resumes_from_a_checkpoint_to_the_same_adapters(tmp_path, caption_data):
    import shutil

    from paddle_caption.model.weights_io import load_safetensors

    cfg = lora_config(tmp_path, caption_data, max_steps=3, save_steps=1, save_total_limit=3)
    train(cfg)
    run = tmp_path / "run"
    reference = load_safetensors(run / "final" / "lora" / "peft_model.safetensors")
    shutil.rmtree(run / "final")  # as if killed after step 2's checkpoint
    assert [p.name for p in sorted(run.glob("checkpoint-*"))][-1] == "checkpoint-000002"
    trainer, summary = train(cfg)
    assert summary["steps"] == 3
    resumed = load_safetensors(run / "final" / "lora" / "peft_model.safetensors")
    assert set(resumed) == set(reference)
    for key in reference:
        np.testing.assert_array_equal(resumed[key].numpy(), reference[key].numpy(), err_msg=key)


# ------------------------------------------------------------------------------- the merged dtype
def bf16_base(tmp_path) -> tuple[Path, dict]:
    """A tiny bfloat16 base model directory and its tensors' bits."""
    import paddle

    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(21)
    model = MgenVLForCausalLM.from_config(MgenVLConfig.from_pretrained(micro_model_json(tmp_path)), dtype="bfloat16")
    model.save_pretrained(tmp_path / "bf16_base")
    return tmp_path / "bf16_base", {k: v.numpy().copy() for k, v in model.state_dict().items()}


def stored(path: Path) -> dict:
    """{name: (dtype, bits)} exactly as a model directory stores them. (Paddle hands bfloat16 to numpy
    as its raw uint16 bits, and `paddle.to_tensor` reads such an array back as bfloat16.)"""
    from paddle_caption.model.weights_io import load_model_state

    return {k: (str(v.dtype), v.numpy().copy()) for k, v in load_model_state(path).items()}


def test_a_bfloat16_base_merges_to_bfloat16_untouched_bits_kept(tmp_path, caption_data):
    """Trained in float32 on a CPU from a bfloat16 base: the merge writes bfloat16 (the base's dtype)
    with every untouched parameter's bits as in the base and the trained ones rounded; `--dtype
    float32` keeps the trained values exactly. A from-scratch architecture merges to float32."""
    import paddle

    from paddle_caption.model.weights_io import checkpoint_dtype, load_safetensors
    from paddle_caption.train.cli import merge_main as main

    base, base_bits = bf16_base(tmp_path)
    cfg = base_config(tmp_path, caption_data, model_config=None, model_name_or_path=str(base),
                      finetune_mode="partial", trainable=["transformer.llm.h.0.mlp.*", "lm_head.*"], max_steps=2)
    trainer, _ = train(cfg)
    assert trainer.base_model.dtype == "float32"  # a bfloat16 checkpoint trains in float32 on a CPU
    trained = {k: v for k, v in load_safetensors(tmp_path / "run/final/local_params.safetensors").items()}

    merge(str(base), tmp_path / "m16", local_path=str(tmp_path / "run"), log=lambda *_: None)
    assert checkpoint_dtype(tmp_path / "m16") == "bfloat16"
    assert json.loads((tmp_path / "m16/merge_info.json").read_text())["dtype"] == "bfloat16"
    merged = stored(tmp_path / "m16")
    assert merged.keys() == base_bits.keys()
    for name, (dtype, bits) in merged.items():
        assert dtype == "paddle.bfloat16", name
        want = trained[name].astype("bfloat16").numpy() if name in trained else base_bits[name]
        np.testing.assert_array_equal(bits, want, err_msg=name)
    assert any(not np.array_equal(merged[n][1], base_bits[n]) for n in trained)

    assert run_cli(main, ["--model_name_or_path", str(base), "--local_path", str(tmp_path / "run"),
                          "--merge_model_path", str(tmp_path / "m32"), "--dtype", "float32"]) == 0
    merged = stored(tmp_path / "m32")
    for name, (dtype, bits) in merged.items():
        assert dtype == "paddle.float32", name
        want = trained[name] if name in trained else paddle.to_tensor(base_bits[name]).astype("float32")
        np.testing.assert_array_equal(bits, want.numpy(), err_msg=name)

    scratch = base_config(tmp_path, caption_data, finetune_mode="partial", trainable=["lm_head.*"], max_steps=1,
                          output_dir=str(tmp_path / "scratch"))
    train(scratch)
    merge(scratch["model_config"], tmp_path / "m_scratch", local_path=str(tmp_path / "scratch"), log=lambda *_: None)
    assert checkpoint_dtype(tmp_path / "m_scratch") == "float32"


def test_lora_merges_into_a_bfloat16_base_in_float32_arithmetic(tmp_path):
    """bfloat16 adapters (as a bfloat16 LoRA run saves them) merge into a bfloat16 base on a CPU:
    W + A·B·alpha/r in float32, stored as bfloat16; the other parameters keep their bits."""
    import paddle

    from paddle_caption.model.weights_io import checkpoint_dtype, load_safetensors
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.train.lora import WEIGHTS_NAME, apply_lora, save_lora

    base, base_bits = bf16_base(tmp_path)
    targets = [r"transformer\.llm\.h\.\d+\.mlp\.w1", r"transformer\.llm\.h\.\d+\.attn\.c_attn"]
    wrapped = apply_lora(MgenVLForCausalLM.from_pretrained(base, dtype="bfloat16"), targets, r=4, alpha=8.0,
                         dropout=0.0, dtype="bfloat16")
    rng = np.random.default_rng(3)
    adapters = {}
    for name, param in wrapped.named_parameters():
        if "lora_" in name:
            assert param.dtype == paddle.bfloat16
            param.set_value(paddle.to_tensor(rng.normal(0, 0.5, param.shape).astype("float32")).astype("bfloat16"))
            adapters[name.removeprefix("model.")] = param.astype("float32").numpy()
    save_lora(wrapped, tmp_path / "lora")
    assert {str(t.dtype) for t in load_safetensors(tmp_path / "lora" / WEIGHTS_NAME).values()} == {"paddle.bfloat16"}

    out = merge(str(base), tmp_path / "merged", lora_path=str(tmp_path / "lora"), log=lambda *_: None)
    assert checkpoint_dtype(out) == "bfloat16"
    merged = stored(out)
    assert merged.keys() == base_bits.keys()
    adapted = {name[:-len(".lora_A")] for name in adapters if name.endswith(".lora_A")}
    assert len(adapted) == 2
    for name, (dtype, bits) in merged.items():
        assert dtype == "paddle.bfloat16", name
        layer = name.removesuffix(".weight")
        if layer not in adapted:
            np.testing.assert_array_equal(bits, base_bits[name], err_msg=name)
            continue
        w = paddle.to_tensor(base_bits[name]).astype("float32").numpy()
        expected = w + adapters[f"{layer}.lora_A"] @ adapters[f"{layer}.lora_B"] * (8.0 / 4)
        got = paddle.to_tensor(bits).astype("float32").numpy()
        np.testing.assert_allclose(got, expected, rtol=2 ** -7, atol=1e-6, err_msg=name)  # one bfloat16 ulp
        assert np.abs(got - w).max() > 0.1, name
