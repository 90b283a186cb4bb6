"""supervised_finetune.py: config errors, freezing, overfitting, checkpoints and resume-after-kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from paddle_caption.runtime import UserError, run_cli
from paddle_caption.train.config import TrainConfig
from paddle_caption.train.trainer import lr_at

from .conftest import micro_model_json

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def write_config(path: Path, **values) -> Path:
    path.write_text(json.dumps(values))
    return path


def base_config(tmp_path, caption_data, **overrides) -> dict:
    cfg = {"model_config": str(micro_model_json(tmp_path)), "train_records": str(caption_data["train"]),
           "learning_rate": 3e-3, "per_device_train_batch_size": 4, "max_steps": 4, "num_workers": 0,
           "num_threads": 1, "output_dir": str(tmp_path / "run"), "progress": False,
           "warmup_ratio": 0.0, "weight_decay": 0.0}
    cfg.update(overrides)
    return cfg


def train(cfg: dict):
    from paddle_caption.train.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(cfg).validate(), log=lambda *_: None)
    summary = trainer.train()
    return trainer, summary


def state_of(model) -> dict:
    return {name: p.numpy().copy() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("content, message", [
    ({"model_config": "x.json", "train_records": "r", "learning_rte": 1}, "unknown key 'learning_rte'"),
    ({"model_config": "x.json", "train_records": "r", "max_steps": "ten"}, "max_steps"),
    ({"model_config": "x.json", "model_name_or_path": "d", "train_records": "r"}, "exactly one of"),
    ({"model_config": "x.json", "train_records": "r", "finetune_mode": "half"}, "finetune_mode"),
])
def test_config_errors_are_one_line(tmp_path, capsys, content, message):
    path = write_config(tmp_path / "c.json", **content)
    from paddle_caption.train.cli import main

    assert run_cli(main, [str(path)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_overrides_are_typed_and_checked(tmp_path):
    path = write_config(tmp_path / "c.json", model_config="x.json", train_records="r")
    cfg = TrainConfig.load(path, ["--learning_rate", "0.5", "--trainable", '["a.*"]', "--max_steps", "7"])
    assert (cfg.learning_rate, cfg.trainable, cfg.max_steps) == (0.5, ["a.*"], 7)
    with pytest.raises(UserError, match="nonsense"):
        TrainConfig.load(path, ["--nonsense", "1"])


def test_missing_records_file_is_named(tmp_path, caption_data):
    cfg = base_config(tmp_path, caption_data, train_records=str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="nope.jsonl"):
        train(cfg)


def test_schedule_warms_up_and_decays_to_floor():
    cfg = TrainConfig(model_config="x", train_records="r", learning_rate=1.0, warmup_ratio=0.1,
                      min_lr_ratio=0.1)
    assert lr_at(cfg, 0.0) == 0.0 and lr_at(cfg, 0.05) == pytest.approx(0.5)
    assert lr_at(cfg, 0.1) == pytest.approx(1.0) and lr_at(cfg, 1.0) == pytest.approx(0.1)
    assert lr_at(cfg, 0.55) == pytest.approx(0.55)  # cosine midpoint between 1.0 and the 0.1 floor


# ------------------------------------------------------------------------------------------ freezing
def test_layers_16_31_recipe_trains_exactly_those_layers(tmp_path, caption_data):
    recipe = json.loads((ROOT / "config/mgen_vl/sft_layers_16_31.json").read_text())
    model_json = micro_model_json(tmp_path, num_hidden_layers=32)
    cfg = base_config(tmp_path, caption_data, model_config=str(model_json), max_steps=2,
                      finetune_mode=recipe["finetune_mode"], trainable=recipe["trainable"],
                      frozen=recipe.get("frozen", []))
    from paddle_caption.train.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(cfg).validate(), log=lambda *_: None)
    import paddle

    paddle.seed(0)
    model = trainer.build_model()  # the initial model with the recipe's freezing applied
    before = state_of(model)
    trainer.build_model = lambda: model  # train this very instance
    trainer.train()
    after = state_of(model)
    inside = {n for n in before if any(n.startswith(f"transformer.llm.h.{i}.") for i in range(16, 32))}
    assert len(inside) == 16 * 8  # c_attn weight+bias, attn.c_proj, ln_1, ln_2, w1, w2, mlp.c_proj
    for name in before:
        changed = not np.array_equal(before[name], after[name])
        assert changed == (name in inside), name


def test_layer_range_beyond_depth_is_refused(tmp_path, caption_data):
    cfg = base_config(tmp_path, caption_data, finetune_mode="partial",
                      trainable=["transformer.llm.h.{16..31}.*"])
    with pytest.raises(UserError, match=r"h\.16\..*matches no parameter"):
        train(cfg)


# ------------------------------------------------------------------------------------------ learning
@pytest.mark.slow
def test_loss_decreases_on_8_sample_overfit(tmp_path, caption_data):
    from paddle_caption.data.records import load_records, write_records

    eight = tmp_path / "eight.jsonl"
    write_records(eight, load_records(caption_data["train"])[:8])
    cfg = base_config(tmp_path, caption_data, train_records=str(eight), per_device_train_batch_size=8,
                      max_steps=40, logging_steps=1, learning_rate=1e-2)
    _, summary = train(cfg)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run/log.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert summary["steps"] == 40 and len(losses) == 40
    assert losses[-1] < 0.4 * losses[0], losses


def test_checkpoint_contents_and_pruning(tmp_path, caption_data):
    cfg = base_config(tmp_path, caption_data, val_records=str(caption_data["val"]), max_steps=4,
                      save_steps=1, save_total_limit=2, eval_steps=2, eval_loss_samples=4,
                      eval_caption_samples=2, eval_max_new_tokens=4, logging_steps=1)
    trainer, summary = train(cfg)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    final = run / "final"
    for name in ("local_params.safetensors", "optimizer.safetensors", "model_config.json", "prompt.json",
                 "train_config.json", "trainer_state.json"):
        assert (final / name).is_file(), name
    assert json.loads((final / "trainer_state.json").read_text())["step"] == 4
    assert not list(run.glob(".*tmp"))
    kinds = [json.loads(line)["kind"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 4 and kinds.count("eval") >= 2
    assert {"val_loss", "CIDEr-D", "BLEU-4", "ROUGE-L"} <= set(summary["eval"])
    from paddle_caption.model.weights_io import load_safetensors

    saved = load_safetensors(final / "local_params.safetensors")
    for name, param in trainer.named_trainable:
        np.testing.assert_array_equal(saved[name].numpy(), param.numpy())


def test_a_finished_run_is_not_retrained_and_a_changed_config_is_refused(tmp_path, caption_data):
    cfg = base_config(tmp_path, caption_data, max_steps=2)
    train(cfg)
    _, again = train(cfg)  # auto-resume finds final/ at step 2 = max_steps: nothing to do
    assert again["steps"] == 2
    with pytest.raises(UserError, match="different training config"):
        train({**cfg, "learning_rate": 1e-2})


# ------------------------------------------------------------------------------------ resume-after-kill
@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, caption_data):
    from paddle_caption.model.weights_io import load_safetensors

    def config(name):
        cfg = base_config(tmp_path, caption_data, max_steps=8, save_steps=2, save_total_limit=1,
                          per_device_train_batch_size=4, output_dir=str(tmp_path / name),
                          model_config=str(micro_model_json(tmp_path, visual={"n_queries": 64})))
        return write_config(tmp_path / f"{name}.json", **cfg)

    cmd = [PY, "supervised_finetune.py"]
    ref = subprocess.run(cmd + [str(config("ref"))], cwd=ROOT, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [str(config("killed"))], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run / "checkpoint-000004").is_dir():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "final").exists()

    resumed = subprocess.run(cmd + [str(config("killed")), "--resume"], cwd=ROOT, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a = load_safetensors(tmp_path / "ref/final/local_params.safetensors")
    b = load_safetensors(run / "final/local_params.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name].numpy(), b[name].numpy(), err_msg=name)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated log lines


def test_lr_scale_multiplies_the_step_of_matching_parameters():
    from paddle_caption.train.freeze import apply_lr_scale

    import paddle
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(4, 4), paddle.nn.Linear(4, 4))
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    factors = apply_lr_scale(model, [["0.*", 0.5], ["0.bias", 0.0]])  # last match wins
    assert factors == {"0.weight": 0.5, "0.bias": 0.0}
    opt = paddle.optimizer.AdamW(learning_rate=0.1, parameters=model.parameters(), weight_decay=0.0)
    model(paddle.randn([3, 4])).sum().backward()
    opt.step()
    moved = {n: np.abs(p.numpy() - before[n]) for n, p in model.named_parameters()}
    # Adam's first step moves each coordinate by lr * factor (m/sqrt(v) = sign(grad))
    np.testing.assert_allclose(moved["1.weight"], 0.1, rtol=1e-3)
    np.testing.assert_allclose(moved["0.weight"], 0.05, rtol=1e-3)
    assert moved["0.bias"].max() == 0.0
    with pytest.raises(UserError, match="lr_scale pattern 'visual.\\*' matches no trainable"):
        apply_lr_scale(model, [["visual.*", 0.1]])


def test_lr_scale_entries_are_validated(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train_records": "x.jsonl", "model_config": "config/model/tiny.json", "max_steps": 1,
                                "lr_scale": [["visual.*"]]}))
    with pytest.raises(UserError, match=r"lr_scale entries must be \[glob, factor >= 0\]"):
        TrainConfig.load(path)


def test_init_from_starts_at_a_checkpoint_and_merging_replays_it(tmp_path, caption_data):
    """A run with init_from starts from another run's checkpoint on the same start model (here:
    the first run trained everything but the vision tower, the second only the vision tower);
    merging the second gives the first's language model and the second's vision tower."""
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.train.merge import merge

    first, _ = train(base_config(tmp_path, caption_data, output_dir=str(tmp_path / "first"), max_steps=3,
                                 frozen=["visual.*"]))
    trained_llm = {k: v for k, v in state_of(first.model).items() if not k.startswith("visual.")}
    second_cfg = base_config(tmp_path, caption_data, output_dir=str(tmp_path / "second"), max_steps=2,
                             finetune_mode="partial", trainable=["visual.*"], init_from=str(tmp_path / "first"))
    second, _ = train(second_cfg)
    after = state_of(second.model)
    for name, value in trained_llm.items():  # untouched by the second run: the first's weights
        np.testing.assert_array_equal(after[name], value)
    merged = merge(second_cfg["model_config"], tmp_path / "merged", local_path=str(tmp_path / "second"),
                   log=lambda *_: None)
    loaded = state_of(MgenVLForCausalLM.from_pretrained(merged))
    for name, value in after.items():
        np.testing.assert_array_equal(loaded[name], value)

    with pytest.raises(UserError, match="init_from .*same start model"):
        train(base_config(tmp_path, caption_data, output_dir=str(tmp_path / "third"), max_steps=1,
                          model_config=str(ROOT / "config/model/tiny.json"), init_from=str(tmp_path / "first")))
