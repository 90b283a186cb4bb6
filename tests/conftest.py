"""Shared test fixtures. Paddle is configured (threads, quiet import) before anything imports it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from paddle_caption.runtime import configure

configure()

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE_DIR = FIXTURES / "qwen_vl_tiny_reference"


@pytest.fixture(params=["numpy", "paddle"])
def kernels(request):
    """Run the test on both kernel paths: the numpy CPU kernels, and Paddle's own (what a GPU runs:
    fused attention, Paddle RoPE and head), forced on CPU by `paddle_kernels()`."""
    import contextlib

    from paddle_caption.model.numpy_bridge import paddle_kernels

    with paddle_kernels() if request.param == "paddle" else contextlib.nullcontext():
        yield request.param


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_model():
    from paddle_caption import MgenVLForCausalLM

    return MgenVLForCausalLM.from_pretrained(REFERENCE_DIR)


@pytest.fixture(scope="session")
def reference_io():
    return dict(np.load(REFERENCE_DIR / "inputs.npz")), dict(np.load(REFERENCE_DIR / "outputs.npz"))


def small_config(**overrides):
    """A small random model in the fixture's shape family (vocab 1000, image ids 990-992)."""
    from paddle_caption import MgenVLConfig

    base = MgenVLConfig.from_pretrained(REFERENCE_DIR).to_dict()
    base.update(overrides)
    return MgenVLConfig.from_dict(base)


def random_image_prompts(cfg, rng, shapes):
    """Prompts with one image span between n and m random text ids, for each (n, m) in `shapes`,
    and a batch of random images for them (ids < 900: clear of the small config's special ids)."""
    import paddle

    span = [cfg.image_start_id] + [cfg.image_pad_id] * cfg.visual.n_queries + [cfg.image_end_id]
    prompts = [list(rng.integers(0, 900, n)) + span + list(rng.integers(0, 900, m)) for n, m in shapes]
    size = cfg.visual.image_size
    images = paddle.to_tensor(rng.standard_normal((len(prompts), 3, size, size)).astype("float32"))
    return prompts, images


def micro_model_json(directory: Path, **overrides) -> Path:
    """A very small model with the REAL vocabulary (so real captions tokenise), as an architecture
    JSON for TrainConfig.model_config. Image span shortened to 16 queries to keep steps fast."""
    import json

    base = json.loads((Path(__file__).parents[1] / "config/model/tiny.json").read_text())
    base.update(hidden_size=32, kv_channels=16, num_attention_heads=2, intermediate_size=64,
                num_hidden_layers=1)
    base["visual"].update(image_size=56, width=32, layers=1, heads=2, output_dim=32, n_queries=16,
                          resampler_heads=2)
    visual = overrides.pop("visual", {})
    base.update(overrides)
    base["visual"].update(visual)
    text = json.dumps(base, sort_keys=True)
    path = Path(directory) / f"model-{abs(hash(text)) % 10**8}.json"  # one file per architecture
    path.write_text(text)
    return path


def make_model_dir(root: Path) -> Path:
    """A micro model with the real vocabulary (real prompts tokenise), saved as root/model."""
    import paddle

    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    paddle.seed(0)
    MgenVLForCausalLM(MgenVLConfig.from_pretrained(micro_model_json(root))).save_pretrained(root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def caption_data(tmp_path_factory):
    """A small converted synthetic ad dataset: {'train': records.jsonl, 'val': ..., 'test_tsv', 'test_refs'}."""
    from paddle_caption.data.convert import RunOptions, convert
    from paddle_caption.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("caption_data")
    write_dataset(root / "tsv", 40, 8, 6, seed=3, workers=1, progress=False)
    opts = RunOptions(workers=1, progress=False)
    convert(root / "tsv" / "train.tsv", root / "train", opts=opts)
    convert(root / "tsv" / "val.tsv", root / "val", opts=opts)
    return {"train": root / "train" / "records.jsonl", "val": root / "val" / "records.jsonl",
            "test_tsv": root / "tsv" / "test.tsv", "test_refs": root / "tsv" / "test_refs.tsv"}


@pytest.fixture(scope="session")
def trained_micro(tmp_path_factory):
    """A micro model (real vocabulary) trained for 60 steps on 200 synthetic ads and merged to
    root/model (with its draft datastore): long enough that its captions follow the ads' formula.
    root/tsv holds train/val/test TSVs (test: 100 images), root/train and root/val the records."""
    from paddle_caption.data.convert import RunOptions, convert
    from paddle_caption.data.synthetic import write_dataset
    from paddle_caption.train.config import TrainConfig
    from paddle_caption.train.merge import merge
    from paddle_caption.train.trainer import Trainer

    root = tmp_path_factory.mktemp("trained_micro")
    write_dataset(root / "tsv", 200, 24, 100, seed=5, workers=1, progress=False)
    for split in ("train", "val"):
        convert(root / "tsv" / f"{split}.tsv", root / split, opts=RunOptions(workers=1, progress=False))
    model_json = micro_model_json(root)
    cfg = {"model_config": str(model_json), "train_records": str(root / "train" / "records.jsonl"),
           "learning_rate": 2e-2, "per_device_train_batch_size": 8, "max_steps": 60, "num_workers": 0,
           "warmup_ratio": 0.05, "frozen": ["visual.*"], "output_dir": str(root / "run"), "progress": False}
    Trainer(TrainConfig.from_dict(cfg).validate(), log=lambda *_: None).train()
    notes = []
    merge(str(model_json), root / "model", local_path=str(root / "run"), log=notes.append)
    assert any(note.startswith("draft datastore: ") for note in notes)
    return root
