"""The 7B recipes as users launch them, on 2 CPU ranks (gloo), combined as users combine them.

Each `config/mgen_vl/*.json` is taken as shipped — recompute, sharding, LoRA (r 64, dropout 0.05),
batch and accumulation, learning rate, schedule, clipping, max_length, workers — with only these
keys changed: the architecture (the micro test model with 32 layers, so `h.16`..`h.31` exist;
real vocabulary), the data (a small converted synthetic set, no validation set), `dtype` float32
(a CPU computes in nothing else), 2 steps, and the output directory. Launched with
`paddle.distributed.launch --nproc_per_node 2`, every run must end with the weights of the same
config trained in one process with twice the accumulation (within 1e-5).

The matrix: every recipe (full, partial 16-31, LoRA) x {data parallel, stage1 sharding} x
{recompute on, off}; the three shipped combinations are among the twelve. Data-parallel runs share
one launched job, sharded runs another (tests/launched/train_configs.py trains a list of configs
through the same entry point as `supervised_finetune.py`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from .conftest import micro_model_json
from .test_data_parallel import final_params, run_launched
from .test_train import ROOT, train

pytestmark = pytest.mark.slow
HEADS_RECIPE = ROOT / "config/mgen_vl/draft_heads.json"  # trains heads on a model the others produce
RECIPES = sorted(p for p in (ROOT / "config/mgen_vl").glob("*.json") if p != HEADS_RECIPE)
SHARDINGS = ("none", "stage1")


def recipe_on_cpu(recipe: Path, tmp_path: Path, caption_data, name: str, **changes) -> dict:
    cfg = json.loads(recipe.read_text())
    cfg.update(model_name_or_path=None, model_config=str(micro_model_json(tmp_path, num_hidden_layers=32)),
               train_records=str(caption_data["train"]), val_records=None, dtype="float32",
               max_steps=2, output_dir=str(tmp_path / name), progress=False)
    cfg.update(changes)
    return cfg


def write(tmp_path: Path, name: str, cfg: dict) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def heads_config(tmp_path: Path, caption_data, name: str, **changes) -> dict:
    """The shipped draft-heads recipe (Medusa heads on a frozen model) on a saved micro model: the
    model, data, targets, dtype float32, 2 steps, batch 2 and a higher learning rate change; all else
    as shipped."""
    from .conftest import make_model_dir

    base = tmp_path / "heads_base" / "model"
    if not base.is_dir():
        make_model_dir(tmp_path / "heads_base")
    cfg = json.loads(HEADS_RECIPE.read_text())
    # a random model's own greedy tokens fall outside the captions' vocabulary: learn the references
    cfg["draft_heads"]["targets"] = "labels"
    cfg.update(model_name_or_path=str(base), train_records=str(caption_data["train"]), val_records=None,
               dtype="float32", learning_rate=1e-2, per_device_train_batch_size=2, max_steps=2,
               output_dir=str(tmp_path / name), progress=False)
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def launched(tmp_path_factory, caption_data):
    """All twelve combinations, trained under the launcher: {(recipe, sharding, recompute): run dir};
    and the draft_heads mode with each sharding x recompute: {("draft_heads", sharding, recompute): run dir}."""
    tmp_path = tmp_path_factory.mktemp("recipes")
    runs, groups = {}, {s: [] for s in SHARDINGS}
    for sharding in SHARDINGS:
        for recompute in (True, False):
            name = f"draft_heads-{sharding}-{'recompute' if recompute else 'plain'}"
            groups[sharding].append(write(tmp_path, name, heads_config(tmp_path, caption_data, name, sharding=sharding,
                                                                       recompute=recompute)))
            runs["draft_heads", sharding, recompute] = tmp_path / name
    for recipe in RECIPES:
        for sharding in SHARDINGS:
            for recompute in (True, False):
                name = f"{recipe.stem}-{sharding}-{'recompute' if recompute else 'plain'}"
                cfg = recipe_on_cpu(recipe, tmp_path, caption_data, name, sharding=sharding, recompute=recompute)
                groups[sharding].append(write(tmp_path, name, cfg))
                runs[recipe.stem, sharding, recompute] = tmp_path / name
    for sharding, configs in groups.items():
        run_launched(tmp_path, f"launch-{sharding}", ROOT / "tests/launched/train_configs.py", *configs,
                     timeout=900)
    return {"tmp": tmp_path, "runs": runs}


@pytest.fixture(scope="module")
def single_process(launched, caption_data):
    """Each recipe in one process with twice its accumulation (recompute off, no sharding)."""
    tmp_path, out = launched["tmp"], {}
    for recipe in RECIPES:
        shipped = json.loads(recipe.read_text())
        cfg = recipe_on_cpu(recipe, tmp_path, caption_data, f"{recipe.stem}-single", sharding="none",
                            recompute=False, gradient_accumulation_steps=2 * shipped["gradient_accumulation_steps"])
        train(cfg)
        out[recipe.stem] = tmp_path / f"{recipe.stem}-single"
    return out


@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "plain"])
def test_launched_draft_heads_equal_one_process(launched, caption_data, sharding, recompute):
    """Medusa heads trained under the launcher (data parallel, with recompute and ZeRO-1) end as one
    process with twice the accumulation; only the heads trained."""
    tmp_path = launched["tmp"]
    single = tmp_path / "draft_heads-single"
    if not single.is_dir():
        accumulation = 2 * json.loads(HEADS_RECIPE.read_text())["gradient_accumulation_steps"]
        train(heads_config(tmp_path, caption_data, "draft_heads-single", gradient_accumulation_steps=accumulation))
    ours, theirs = final_params(launched["runs"]["draft_heads", sharding, recompute]), final_params(single)
    assert ours.keys() == theirs.keys() and all(k.startswith("draft_heads.") for k in ours)
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-5, err_msg=name)
    assert max(float(np.abs(v).max()) for k, v in ours.items() if k.endswith("linear.weight")) > 1e-6


def test_the_matrix_covers_every_shipped_recipe_as_shipped():
    shipped = {(r.stem, json.loads(r.read_text()).get("sharding", "none"), json.loads(r.read_text())["recompute"])
               for r in RECIPES}
    assert len(RECIPES) == 3 and {r.stem for r in RECIPES} == {"lora_sft", "sft_full", "sft_layers_16_31"}
    assert all(s in SHARDINGS for _, s, _ in shipped)  # each recipe's own combination is launched


@pytest.mark.parametrize("recipe", [r.stem for r in RECIPES])
@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "plain"])
def test_launched_recipe_equals_one_process(launched, single_process, recipe, sharding, recompute):
    run = launched["runs"][recipe, sharding, recompute]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["stop_reason"] == "max_steps"
    reference = single_process[recipe]
    if recipe == "lora_sft":  # a LoRA run saves its adapters
        ours, theirs = lora_params(run), lora_params(reference)
        assert ours and all("lora" in k for k in ours)
    else:
        ours, theirs = final_params(run), final_params(reference)
    assert ours.keys() == theirs.keys()
    if recipe == "sft_layers_16_31":
        assert {k.split(".")[3] for k in ours} == {str(i) for i in range(16, 32)}
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-5, err_msg=name)
    # the runs trained: a launched run's weights moved from where training started (LoRA's B from 0)
    if recipe == "lora_sft":
        assert max(float(np.abs(v).max()) for k, v in ours.items() if "lora_B" in k) > 1e-6
    else:
        start = initial_weights(recipe, launched["tmp"])
        assert max(float(np.abs(ours[n] - start[n]).max()) for n in ours) > 1e-6
    optimizer_files = sorted(p.name for p in (run / "final").glob("optimizer*.safetensors"))
    assert optimizer_files == (["optimizer.rank0-of-2.safetensors", "optimizer.rank1-of-2.safetensors"]
                               if sharding == "stage1" else ["optimizer.safetensors"])


def lora_params(run: Path) -> dict:
    from paddle_caption.model.weights_io import load_safetensors

    files = sorted((run / "final/lora").glob("*.safetensors"))
    assert files, f"no LoRA weights in {run / 'final'}"
    return {k: v.numpy() for f in files for k, v in load_safetensors(f).items()}


def initial_weights(recipe: str, tmp_path: Path) -> dict:
    """Every parameter as training starts (the seeded initialisation)."""
    from paddle_caption.train.config import TrainConfig
    from paddle_caption.train.model_init import initial_model

    cfg = TrainConfig.from_dict(json.loads((tmp_path / f"{recipe}-none-plain.json").read_text()))
    model, _ = initial_model(None, cfg.model_config, cfg.init_seed)
    return {n: p.numpy() for n, p in model.named_parameters()}
