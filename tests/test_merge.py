"""LoRA training (paddlenlp.peft) and tools/merge_local_params.py: merged model == trained model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paddle_caption.data.dataset import collate_batch
from paddle_caption.runtime import UserError
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

    from paddle_caption.model.checkpoint import load_safetensors
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
    from paddle_caption.model.checkpoint import load_safetensors, save_safetensors
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

    from paddle_caption.model.checkpoint import load_safetensors

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
