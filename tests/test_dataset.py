import base64
import importlib
import io
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

from paddle_caption.data.dataset import (
    CaptionDataset, Collator, LengthGroupedBatchSampler, collate_batch, make_dataloader,
)
from paddle_caption.data.images import CLIP_MEAN, CLIP_STD
from paddle_caption.data.prompts import PromptTemplate
from paddle_caption.data.samples import build_sample
from paddle_caption.model.config import IGNORE_INDEX
from paddle_caption.tokenizer import QWenVLTokenizer

IMAGE_SIZE = 28
MAX_LENGTH = 512
COLOURS = [(255, 0, 128), (10, 200, 30), (0, 0, 0), (255, 255, 255), (90, 60, 240)]
CAPTIONS = [
    "卡通风格。图片中间是一个红色的圆形，背景是白色。",
    "写实风格。",
    "插画风格。一只小猫坐在窗台上，窗外是蓝色的天空和白云，阳光照进房间，地板上有一块彩色的地毯。",
    "纯文字风格。白色背景上写着黑色的“限时优惠”四个大字。",
    "3D风格。一个金色的奖杯。",
]


def _read_row_image(record):
    """The test's own reader for its TSV layout (id, caption, base64 image)."""
    with open(record["tsv"], "rb") as handle:
        handle.seek(record["offset"])
        row = handle.read(record["length"])
    return base64.b64decode(row.split(b"\t")[2])


@pytest.fixture(autouse=True)
def image_reader(monkeypatch):
    """Route the dataset's `records.read_image_bytes` call to this test's TSV reader.

    The TSV layout belongs to the converter (`paddle_caption.data.records`); these tests only
    need the dataset to go through that function. Workers are forked, so the patch reaches them.
    """
    try:
        module = importlib.import_module("paddle_caption.data.records")
    except ModuleNotFoundError:
        module = types.ModuleType("paddle_caption.data.records")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setattr(sys.modules["paddle_caption.data"], "records", module, raising=False)
    monkeypatch.setattr(module, "read_image_bytes", _read_row_image, raising=False)


def write_records(tmp_path, n=len(CAPTIONS), broken=()):
    tsv = tmp_path / "images.tsv"
    records, offset = [], 0
    with open(tsv, "wb") as handle:
        for i in range(n):
            colour = COLOURS[i % len(COLOURS)]
            buffer = io.BytesIO()
            Image.new("RGB", (40 + 7 * i, 30 + 3 * i), colour).save(buffer, format="PNG")
            if i in broken:
                buffer = io.BytesIO(b"not an image")
            row = f"ad_{i:03d}\t{CAPTIONS[i % len(CAPTIONS)]}\t".encode() + base64.b64encode(buffer.getvalue())
            handle.write(row + b"\n")
            records.append({"id": f"ad_{i:03d}", "caption": CAPTIONS[i % len(CAPTIONS)], "tsv": str(tsv),
                            "offset": offset, "length": len(row), "width": 40 + 7 * i, "height": 30 + 3 * i})
            offset += len(row) + 1
    return records


@pytest.fixture(scope="module")
def tok():
    return QWenVLTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def template():
    return PromptTemplate.from_files("style_aware.txt")


@pytest.fixture
def dataset(tmp_path, tok, template):
    return CaptionDataset(write_records(tmp_path), tok, template, IMAGE_SIZE, MAX_LENGTH)


def test_item_matches_build_sample(dataset, tok, template):
    for index in range(len(dataset)):
        item = dataset[index]
        expected = build_sample(tok, template, CAPTIONS[index], MAX_LENGTH)
        assert item["id"] == f"ad_{index:03d}"
        assert item["input_ids"].dtype == np.int64 and item["labels"].dtype == np.int64
        assert np.array_equal(item["input_ids"], expected["input_ids"])
        assert np.array_equal(item["labels"], expected["labels"])
        assert item["image"].dtype == np.float32 and item["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert dataset.lengths[index] == len(item["input_ids"])


def test_collated_batch(dataset, tok):
    items = [dataset[i] for i in range(len(dataset))]
    batch = Collator(tok.pad_id)(items)
    lengths = [len(it["input_ids"]) for it in items]
    B, T = len(items), max(lengths)
    assert T < MAX_LENGTH  # padded to the longest sample, not to max_length
    assert batch["input_ids"].shape == (B, T) and batch["input_ids"].dtype == np.int64
    assert batch["attention_mask"].shape == (B, T) and batch["attention_mask"].dtype == np.int64
    assert batch["labels"].shape == (B, T) and batch["labels"].dtype == np.int64
    assert batch["images"].shape == (B, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["images"].dtype == np.float32
    assert batch["ids"] == [f"ad_{i:03d}" for i in range(B)]
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)  # right padding
        assert (batch["input_ids"][row, n:] == 151643).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert np.array_equal(batch["input_ids"][row, :n], items[row]["input_ids"])
        assert np.array_equal(batch["labels"][row, :n], items[row]["labels"])
    # Solid colours survive the bicubic resize, so every pixel is ((c/255) - mean) / std.
    for row in range(B):
        expected = (np.array(COLOURS[row], dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        image = batch["images"][row]
        np.testing.assert_allclose(image.mean(axis=(1, 2)), expected, atol=1e-5)
        np.testing.assert_allclose(image.std(axis=(1, 2)), 0.0, atol=1e-5)
    assert collate_batch(items[:1], 7)["input_ids"].shape == (1, lengths[0])


def test_bad_image_names_the_record(tmp_path, tok, template):
    dataset = CaptionDataset(write_records(tmp_path, broken={1}), tok, template, IMAGE_SIZE, MAX_LENGTH)
    dataset[0]
    with pytest.raises(ValueError, match="record ad_001 .*undecodable_image"):
        dataset[1]


def test_max_length_too_small(tmp_path, tok, template):
    with pytest.raises(ValueError, match="max_length 100"):
        CaptionDataset(write_records(tmp_path), tok, template, IMAGE_SIZE, 100)
    with pytest.raises(ValueError, match="missing keys"):
        CaptionDataset([{"id": "x", "caption": "a"}], tok, template, IMAGE_SIZE, MAX_LENGTH)


def test_sampler_is_deterministic_and_resumable():
    lengths = np.random.default_rng(0).integers(300, 500, size=103)
    sampler = LengthGroupedBatchSampler(lengths, batch_size=4, seed=7, mega_batch_mult=4)
    sampler.set_epoch(3)
    epoch3 = list(sampler)
    assert len(epoch3) == len(sampler) == sampler.batches_per_epoch == 26
    assert sorted(i for b in epoch3 for i in b) == list(range(103))
    assert epoch3 == LengthGroupedBatchSampler(lengths, 4, seed=7, mega_batch_mult=4).epoch_batches(3)
    assert epoch3 != sampler.epoch_batches(4) and epoch3 != LengthGroupedBatchSampler(
        lengths, 4, seed=8, mega_batch_mult=4).epoch_batches(3)
    sampler.set_epoch(3, skip_batches=10)
    assert list(sampler) == epoch3[10:] and len(sampler) == 16
    # Grouping puts similar lengths together: less padding than random batches.
    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)
    plain = LengthGroupedBatchSampler(lengths, 4, seed=7, group_by_length=False)
    assert padding(epoch3) < padding(plain.epoch_batches(3)) / 2
    dropped = LengthGroupedBatchSampler(lengths, 4, seed=7, drop_last=True)
    assert len(dropped) == 25 and all(len(b) == 4 for b in dropped)
    ordered = LengthGroupedBatchSampler(lengths, 4, shuffle=False, group_by_length=False)
    assert list(ordered)[0] == [0, 1, 2, 3]


def _as_numpy(batch):
    return {k: (v if k == "ids" else np.asarray(v.numpy())) for k, v in batch.items()}


def _run_epochs(loader):
    out = []
    for epoch, skip in ((0, 0), (1, 2)):
        loader.batch_sampler.set_epoch(epoch, skip_batches=skip)
        out.append([_as_numpy(b) for b in loader])
    return out


def test_dataloader_workers_match_single_process(tmp_path, tok, template):
    dataset = CaptionDataset(write_records(tmp_path, n=13), tok, template, IMAGE_SIZE, MAX_LENGTH)
    start = time.perf_counter()
    single = _run_epochs(make_dataloader(dataset, batch_size=3, shuffle=True, seed=5, num_workers=0))
    multi = _run_epochs(make_dataloader(dataset, batch_size=3, shuffle=True, seed=5, num_workers=2))
    elapsed = time.perf_counter() - start
    assert [len(e) for e in single] == [5, 3]
    for epoch_single, epoch_multi in zip(single, multi):
        assert len(epoch_single) == len(epoch_multi)
        for a, b in zip(epoch_single, epoch_multi):
            assert a["ids"] == b["ids"]
            for key in ("input_ids", "attention_mask", "labels", "images"):
                assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert single[0][0]["input_ids"].dtype == np.int64 and single[0][0]["images"].dtype == np.float32
    # The resumed epoch continues exactly where a full epoch 1 would be after 2 batches.
    full = LengthGroupedBatchSampler(dataset.lengths, 3, seed=5).epoch_batches(1)
    assert [b["ids"] for b in single[1]] == [[f"ad_{i:03d}" for i in batch] for batch in full[2:]]
    print(f"dataloader test: {elapsed:.2f} s")
