"""The synthetic ad world: determinism, caption grammar, drawing rules and dirty-row bookkeeping."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from paddle_caption.data import synthetic as syn
from paddle_caption.data.synthetic import cli as synthetic_cli
from paddle_caption.data.synthetic import render
from paddle_caption.data.images import ImageRejected, b64decode_strict, decode_image
from paddle_caption.data.synthetic import (BACKGROUNDS, COLOURS, SHAPES, STYLES, CaptionFields, format_caption,
                                           parse_caption, render_ad, sample_fields, write_dataset)
from paddle_caption.runtime import run_cli

COUNTS = dict(n_train=100, n_val=20, n_test=20)
FILES = ("train.tsv", "val.tsv", "test.tsv", "test_refs.tsv")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    summary = write_dataset(out, **COUNTS, seed=3, workers=1, progress=False)
    return out, summary


def read_rows(path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def decode_b64_image(payload: str) -> Image.Image:
    return decode_image(b64decode_strict(payload))


def test_same_seed_is_byte_identical_across_worker_counts(dataset, tmp_path):
    out, _ = dataset
    write_dataset(tmp_path, **COUNTS, seed=3, workers=2, progress=False)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_different_seed_differs(dataset, tmp_path):
    out, _ = dataset
    write_dataset(tmp_path, n_train=5, n_val=5, n_test=5, seed=4, workers=1, progress=False)
    for name in FILES:
        new, old = (tmp_path / name).read_text().splitlines(), (out / name).read_text().splitlines()[:5]
        assert new != old, name


def test_clean_captions_follow_the_grammar(dataset):
    out, _ = dataset
    val = read_rows(out / "val.tsv")
    refs = read_rows(out / "test_refs.tsv")
    train = [r for r in read_rows(out / "train.tsv") if len(r) == 3 and "风格" in r[2]]
    captions = [r[2] for r in val] + [r[1] for r in refs] + [r[2] for r in train]
    assert len(captions) > 120
    styles = Counter()
    for caption in captions:
        fields = parse_caption(caption)
        assert fields is not None, caption
        assert format_caption(fields) == caption
        if fields.style == syn.LINE_ART:
            assert fields.background == "白色"
        styles[fields.style] += 1
    assert set(styles) == set(STYLES)  # 160 captions should cover every style


def test_val_and_test_rows_are_clean_and_well_formed(dataset):
    out, _ = dataset
    val, test, refs = (read_rows(out / n) for n in ("val.tsv", "test.tsv", "test_refs.tsv"))
    assert len(val) == COUNTS["n_val"] and all(len(r) == 3 for r in val)
    assert len(test) == COUNTS["n_test"] and all(len(r) == 2 for r in test)
    assert all(len(r) == 2 for r in refs)
    assert [r[0] for r in refs] == [r[0] for r in test]
    assert len({r[0] for r in test}) == len(test)
    assert test[0][0] == "test_000001"
    for row in val + test:
        img = decode_b64_image(row[1])
        assert 320 <= img.width <= 640 and 320 <= img.height <= 640
        assert Image.open(io.BytesIO(b64decode_strict(row[1]))).format == "JPEG"


def test_corner_is_the_caption_background(dataset):
    out, _ = dataset
    for row in read_rows(out / "val.tsv"):
        fields = parse_caption(row[2])
        pixel = np.asarray(decode_b64_image(row[1]), dtype=int)[2, 2]
        tolerance = 25 if fields.style == "水彩风格" else 8  # watercolour adds ±12 noise per channel
        assert np.abs(pixel - BACKGROUNDS[fields.background]).max() <= tolerance, (row[2], pixel)


def test_dirty_counts_match_the_file(dataset):
    out, summary = dataset
    dirty = summary["dirty"]
    n = COUNTS["n_train"]
    assert set(dirty) == set(syn.DIRTY_KINDS)
    assert sum(dirty.values()) == summary["train_dirty"] == round(0.08 * n)
    assert all(v >= 1 for v in dirty.values())

    rows = read_rows(out / "train.tsv")
    assert len(rows) == n
    seen, found = set(), Counter()
    for row in rows:
        if row[0] in seen:
            found["duplicate_id"] += 1
        seen.add(row[0])
        if len(row) != 3:
            found["missing_column"] += 1
            continue
        if row[2] == "":
            found["empty_caption"] += 1
        elif "风格" not in row[2]:
            found["no_style"] += 1
            assert parse_caption(row[2]) is None
        try:
            decode_b64_image(row[1])
        except ImageRejected:
            found["bad_image"] += 1
    assert dict(found) == {k: v for k, v in dirty.items() if v}
    assert summary["train_clean"] == n - sum(dirty.values())


def test_parse_rejects_text_outside_the_grammar():
    good = "卡通风格。图片中间是一个红色的圆形，背景是白色。"
    assert parse_caption(good) == CaptionFields("卡通风格", "白色", [("红色", "圆形")])
    two = "黑白简笔风格。图片左边是一个三角形，右边是一个圆形，背景是白色。"
    assert parse_caption(two) == CaptionFields("黑白简笔风格", "白色", [(None, "三角形"), (None, "圆形")])
    for text in ["", "hello", None, 42,
                 "卡通风格。图片中间是一个粉色的圆形，背景是白色。",  # 粉色 is not a colour of the world
                 "卡通风格。图片中间是一个圆形，背景是白色。",  # colour missing outside line art
                 "黑白简笔风格。图片中间是一个红色的圆形，背景是白色。",  # colour present in line art
                 "卡通风格。图片中间是一个红色的圆形，背景是白色",  # no final 。
                 good + good, good + " ", "卡通风格。图片左边是一个红色的圆形，背景是白色。"]:
        assert parse_caption(text) is None, text


def test_format_refuses_fields_outside_the_world():
    with pytest.raises(ValueError):
        format_caption(CaptionFields("卡通风格", "白色", [("粉色", "圆形")]))
    with pytest.raises(ValueError):
        format_caption(CaptionFields("卡通风格", "白色", []))
    assert (format_caption(CaptionFields("水彩风格", "米色", [("蓝色", "五角星"), ("黄色", "菱形")]))
            == "水彩风格。图片左边是一个蓝色的五角星，右边是一个黄色的菱形，背景是米色。")


def render_with_layout(fields: CaptionFields, seed: int):
    """Render, and replay the same RNG draws to learn where the objects were placed."""
    img = render_ad(fields, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(320, 641, size=2))
    assert img.size == (width, height)
    return np.asarray(img, dtype=int), render._layout(fields, width, height, rng)


def close(pixel, rgb, tol=6):
    return np.abs(pixel - np.array(rgb)).max() <= tol


@pytest.mark.parametrize("shape", SHAPES)
def test_cartoon_object_is_filled_and_placed(shape):
    for seed, colour in enumerate(COLOURS):
        fields = CaptionFields("卡通风格", "灰色", [(colour, shape)])
        arr, (p,) = render_with_layout(fields, seed)
        h, w = arr.shape[:2]
        assert abs(p.cx - w / 2) <= 0.1 * w + 1 and abs(p.cy - h / 2) <= 0.1 * h + 1
        assert 0.35 * min(w, h) <= p.size <= 0.5 * min(w, h)
        at = lambda fx, fy: arr[int(p.cy + fy * p.size), int(p.cx + fx * p.size)]  # noqa: E731
        assert close(at(0, 0), COLOURS[colour]), (shape, colour)
        # The outline is black, and the bounding box is exactly the object size.
        edge = {"圆形": (0, -0.49), "正方形": (0, -0.49), "菱形": (0, -0.47), "三角形": (0, 0.42),
                "五角星": (-0.47, -0.11)}[shape]
        assert close(at(*edge), (0, 0, 0), 40), (shape, at(*edge))
        # Orientation: what is background near the top-left corner of the box.
        corner = close(at(-0.45, -0.45), BACKGROUNDS["灰色"])
        assert corner == (shape != "正方形"), shape
        if shape == "三角形":  # apex up: the box's top centre is inside, its bottom corners too
            assert not close(at(0, -0.40), BACKGROUNDS["灰色"])
            assert not close(at(-0.45, 0.40), BACKGROUNDS["灰色"])
        if shape == "五角星":  # point up, so the bottom centre (between the two legs) is background
            assert not close(at(0, -0.45), BACKGROUNDS["灰色"])
            assert close(at(0, 0.40), BACKGROUNDS["灰色"])


def test_two_objects_sit_in_their_halves_without_overlap():
    for seed in range(30):
        fields = sample_fields(np.random.default_rng(seed))
        fields = CaptionFields("3D风格", fields.background, [("红色", "圆形"), ("蓝色", "正方形")])
        arr, (left, right) = render_with_layout(fields, seed)
        w = arr.shape[1]
        assert left.cx < w / 2 < right.cx
        assert left.cx + left.size / 2 * (1 + 2 * render.EXTRUDE_OFFSET) < right.cx - right.size / 2
        assert close(arr[int(left.cy), int(left.cx)], COLOURS["红色"])
        assert close(arr[int(right.cy), int(right.cx)], COLOURS["蓝色"])


def test_style_rules():
    shape = [(None, "圆形")]
    arr, (p,) = render_with_layout(CaptionFields("黑白简笔风格", "白色", shape), 1)
    assert close(arr[int(p.cy), int(p.cx)], BACKGROUNDS["白色"])  # outline only, no fill
    assert close(arr[int(p.cy), int(p.cx - p.size * 0.49)], (0, 0, 0), 40)

    arr, (p,) = render_with_layout(CaptionFields("3D风格", "米色", [("绿色", "正方形")]), 2)
    dark = np.array(COLOURS["绿色"]) // 2  # the extruded copy peeks out at the bottom-right
    assert close(arr[int(p.cy + p.size * 0.53), int(p.cx)], dark, 3)

    arr, (p,) = render_with_layout(CaptionFields("写实风格", "白色", [("蓝色", "正方形")]), 3)
    top_left, bottom_right = arr[int(p.cy - p.size * 0.45), int(p.cx - p.size * 0.45)], \
        arr[int(p.cy + p.size * 0.45), int(p.cx + p.size * 0.45)]
    assert top_left.sum() > np.sum(COLOURS["蓝色"]) > bottom_right.sum()  # lit top-left, dark bottom-right
    shadow = arr[int(p.cy + p.size * 0.52), int(p.cx)]
    assert (shadow < np.array(BACKGROUNDS["白色"]) - 20).all()  # grey shadow below the object

    arr, _ = render_with_layout(CaptionFields("像素风格", "黑色", [("黄色", "五角星")]), 4)
    blocks = arr[: arr.shape[0] // 16 * 16, : arr.shape[1] // 16 * 16]
    h, w = blocks.shape[0] // 16, blocks.shape[1] // 16
    tiles = blocks.reshape(h, 16, w, 16, 3)
    assert (tiles == tiles[:, :1, :, :1]).all()  # constant 16x16 blocks

    arr, _ = render_with_layout(CaptionFields("水彩风格", "灰色", [("红色", "圆形")]), 5)
    corner = arr[:40, :40] - np.array(BACKGROUNDS["灰色"])
    assert corner.min() >= -12 and corner.max() <= 12 and corner.std() > 4  # ±12 noise on the background


def test_sample_fields_follows_the_world():
    rng = np.random.default_rng(0)
    samples = [sample_fields(rng) for _ in range(600)]
    for f in samples:
        assert parse_caption(format_caption(f)) == f
    assert Counter(len(f.objects) for f in samples).keys() == {1, 2}
    assert {f.background for f in samples if f.style == syn.LINE_ART} == {"白色"}
    assert {f.background for f in samples} == set(BACKGROUNDS)


def test_cli_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "data"
    assert run_cli(synthetic_cli.main, [str(out), "--train", "30", "--val", "3", "--test", "2", "--seed", "1",
                               "--workers", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "30 rows" in printed and "dirty" in printed and "duplicate_id=" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # no temp files left behind
    assert run_cli(synthetic_cli.main, [str(out), "--train", "-1"]) == 2
    assert "--train" in capsys.readouterr().err


# ---- noise for data curation -----------------------------------------------------------------------
NOISE = syn.NoiseConfig(mismatched=0.2, wrong_word=0.1, truncated=0.1, near_duplicate=0.1, unlabeled=5)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy")
    summary = write_dataset(out, 60, 3, 3, seed=2, workers=1, progress=False, noise=NOISE)
    return out, summary


def test_noise_is_deterministic_and_reported_outside_the_training_file(noisy, tmp_path):
    out, summary = noisy
    write_dataset(tmp_path, 60, 3, 3, seed=2, workers=2, progress=False, noise=NOISE)
    for name in FILES + ("train_noise.tsv", "unlabeled.tsv", "unlabeled_refs.tsv"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    assert summary["noise"] == {"mismatched_caption": 12, "wrong_style": 3, "wrong_colour": 3,
                                "truncated_caption": 6, "near_duplicate_image": 6}
    truth = read_rows(out / "train_noise.tsv")
    assert len(truth) == sum(summary["noise"].values()) == len({r[0] for r in truth})
    train = {r[0]: r for r in read_rows(out / "train.tsv")}
    assert all(len(r) == 3 for r in (train[t[0]] for t in truth))  # noise only on otherwise clean rows
    assert "noise" not in (out / "train.tsv").read_text()
    assert summary["train_clean"] == 60 - summary["train_dirty"] - len(truth)


def test_each_noise_kind_is_what_it_says(noisy):
    out, _ = noisy
    train = {r[0]: r for r in read_rows(out / "train.tsv")}
    for row_id, kind, detail in read_rows(out / "train_noise.tsv"):
        caption = train[row_id][2]
        if kind == "mismatched_caption":
            assert caption != detail and parse_caption(caption) is not None and parse_caption(detail) is not None
        elif kind in ("wrong_style", "wrong_colour"):
            got, true = parse_caption(caption), parse_caption(detail)
            assert got is not None and got.background == true.background
            changed = (got.style != true.style, got.objects != true.objects)
            assert changed == ((True, False) if kind == "wrong_style" else (False, True))
        elif kind == "truncated_caption":
            assert detail.startswith(caption) and 0.3 * len(detail) - 1 <= len(caption) <= 0.8 * len(detail)
        else:  # near duplicate: the donor's caption, and an image a perceptual hash barely tells apart
            import imagehash

            donor = train[detail]
            assert caption == donor[2]
            a, b = decode_b64_image(train[row_id][1]), decode_b64_image(donor[1])
            assert a.tobytes() != b.tobytes()
            assert imagehash.phash(a, hash_size=16) - imagehash.phash(b, hash_size=16) <= 4


def test_unlabeled_pool_has_images_and_hidden_references(noisy):
    out, _ = noisy
    pool, refs = read_rows(out / "unlabeled.tsv"), read_rows(out / "unlabeled_refs.tsv")
    assert [len(r) for r in pool] == [2] * 5 and [r[0] for r in pool] == [r[0] for r in refs]
    assert all(parse_caption(r[1]) is not None for r in refs)
    assert pool[0][0] == "unlabeled_000001"


def test_noise_shares_are_checked():
    with pytest.raises(Exception, match="noise shares"):
        syn.NoiseConfig(mismatched=0.8, truncated=0.2).validate()


# Digests of the files the generator wrote before it was split into world/render/rows/writer
# (issue 22): the same seed, counts and noise must keep giving these exact bytes.
GOLDEN_SHA256 = {
    "train.tsv": "b90f90ac23853342a2db41729dfb7d4f1f3182d5b14538ffb9c9099c78f778bf",
    "val.tsv": "6f9059de6f121fe942ba342e50d5164b0b41d6069782be6d26f46cf686d0b86c",
    "test.tsv": "6421382d91cbd45690e6f798b2c9e21416c9a10bdb0ad90991946ca11ab16af9",
    "test_refs.tsv": "283ee4ec1f0618d726228bf156391cf6c5cad2cf58160a8bdcd6748aa8095cbf",
    "train_noise.tsv": "6eb9cb61013712a624e8f380c844d89f485f3d8a0560a89e6709c4d8144a457c",
    "unlabeled.tsv": "7dd75a7e2922c183fa3f79b5a35baf88cc2da782d111c68724de2b2e8dc29b47",
    "unlabeled_refs.tsv": "df5a86b3e526cbecd3a78cf2d987bbb5f71f4c0c7dd10aca350cefd4791c1f63",
}


def test_output_bytes_match_the_recorded_digests(tmp_path):
    import hashlib

    noise = syn.NoiseConfig(mismatched=0.1, wrong_word=0.1, truncated=0.1, near_duplicate=0.1, unlabeled=10)
    write_dataset(tmp_path, 60, 10, 10, seed=3, workers=1, progress=False, noise=noise)
    digests = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in GOLDEN_SHA256}
    assert digests == GOLDEN_SHA256
