import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddle_caption.data.dataset import (
    CaptionDataset, Collator, LengthGroupedBatchSampler, RankBatchSampler, collate_batch, make_dataloader,
)
from paddle_caption.data.records import load_records
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


SIZES = [(40 + 7 * i, 36 + 3 * i) for i in range(16)]


def write_records(tmp_path, n=len(CAPTIONS)):
    """Real contest rows (`id \\t base64 \\t caption`, one with CRLF) through the real converter."""
    from paddle_caption.data.convert import RunOptions, convert

    lines = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", SIZES[i], COLOURS[i % len(COLOURS)]).save(buffer, format="PNG")
        lines.append(f"ad_{i:03d}\t".encode() + base64.b64encode(buffer.getvalue())
                     + f"\t{CAPTIONS[i % len(CAPTIONS)]}".encode() + (b"\r\n" if i == 1 else b"\n"))
    tsv = tmp_path / "images.tsv"
    tsv.write_bytes(b"".join(lines))
    convert(tsv, tmp_path / "converted", opts=RunOptions(workers=1, progress=False))
    records = load_records(tmp_path / "converted" / "records.jsonl")
    assert [r["id"] for r in records] == [f"ad_{i:03d}" for i in range(n)]
    assert [(r["width"], r["height"]) for r in records] == SIZES[:n]
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


def test_a_changed_tsv_names_the_record(tmp_path, tok, template):
    records = write_records(tmp_path)
    dataset = CaptionDataset(records, tok, template, IMAGE_SIZE, MAX_LENGTH)
    tsv = Path(records[0]["tsv"])
    data = bytearray(tsv.read_bytes())
    # The image payload of row 1 replaced by base64 of the same length that is no image.
    start = records[1]["offset"] + len("ad_001\t")
    end = data.index(b"\t", start)
    data[start:end] = base64.b64encode(b"x" * ((end - start) // 4 * 3))[: end - start]
    # Row 2's id changed in place: the record no longer matches its row.
    at = records[2]["offset"]
    data[at:at + 6] = b"zz_002"
    tsv.write_bytes(bytes(data))
    dataset[0]
    with pytest.raises(ValueError, match="record ad_001 .*undecodable_image"):
        dataset[1]
    with pytest.raises(ValueError, match="record ad_002 .*is not record 'ad_002'"):
        dataset[2]


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


def test_rank_samplers_split_an_epoch_evenly():
    lengths = np.arange(23)
    base = LengthGroupedBatchSampler(lengths, batch_size=2, seed=1)  # 12 batches, the last one short
    shares = [RankBatchSampler(base, rank, 3) for rank in range(3)]
    epochs = [s.epoch_batches(2) for s in shares]
    assert [len(e) for e in epochs] == [4, 4, 4] and all(s.batches_per_epoch == 4 for s in shares)
    assert [b for rank_batches in zip(*epochs) for b in rank_batches] == base.epoch_batches(2)[:12]
    shares[1].set_epoch(2, skip_batches=3)
    assert list(shares[1]) == epochs[1][3:] and len(shares[1]) == 1
    assert RankBatchSampler(base).epoch_batches(0) == base.epoch_batches(0)


def test_rank_samplers_with_accumulation_hold_the_steps_of_one_process():
    base = LengthGroupedBatchSampler(np.arange(29), batch_size=2, seed=4)  # 15 batches
    single = RankBatchSampler(base, 0, 1, accumulation=4)  # one process, 4 micro-batches a step
    assert single.batches_per_epoch == 12 and single.epoch_batches(0) == base.epoch_batches(0)[:12]
    ranks = [RankBatchSampler(base, rank, 2, accumulation=2) for rank in range(2)]  # 2 ranks x 2
    assert all(r.batches_per_epoch == 6 for r in ranks)
    for step in range(3):
        one = single.epoch_batches(0)[4 * step:4 * step + 4]
        both = [b for r in ranks for b in r.epoch_batches(0)[2 * step:2 * step + 2]]
        assert sorted(one) == sorted(both)  # the same micro-batches make up every optimiser step


def test_dataloader_workers_match_single_process(tmp_path, tok, template):
    dataset = CaptionDataset(write_records(tmp_path, n=13), tok, template, IMAGE_SIZE, MAX_LENGTH)
    single = _run_epochs(make_dataloader(dataset, batch_size=3, shuffle=True, seed=5, num_workers=0))
    multi = _run_epochs(make_dataloader(dataset, batch_size=3, shuffle=True, seed=5, num_workers=2))
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


def test_iter_captions_reads_records_and_names_a_bad_line(tmp_path):
    from paddle_caption.data.records import iter_captions
    from paddle_caption.runtime import UserError

    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "caption": "卡通风格。"}\n\n{"caption": "写实风格。"}\n', encoding="utf-8")
    assert list(iter_captions(path)) == ["卡通风格。", "写实风格。"]
    path.write_text('{"caption": "卡通风格。"}\n{"caption": 3}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"r.jsonl:2: expected an object with a \"caption\" string"):
        list(iter_captions(path))
