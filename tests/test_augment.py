"""Caption-aware augmentation (data/augment.py): flips swap position words or skip, scale jitter keeps
the whole image, brightness/contrast keep hue; the dataset hook and its determinism."""
from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
from PIL import Image

from paddle_caption.data.augment import AugmentConfig, CaptionAugmenter, augment_image, flip_caption, sample_rng
from paddle_caption.data.dataset import CaptionDataset
from paddle_caption.runtime import UserError

from .test_dataset import IMAGE_SIZE, MAX_LENGTH, template, tok, write_records  # noqa: F401 (fixtures)


@pytest.mark.parametrize("caption, flipped", [
    # the synthetic world's grammar
    ("3D风格。图片左边是一个绿色的正方形，右边是一个红色的圆形，背景是灰色。",
     "3D风格。图片右边是一个绿色的正方形，左边是一个红色的圆形，背景是灰色。"),
    ("写实风格。图片中间是一个蓝色的五角星，背景是白色。", "写实风格。图片中间是一个蓝色的五角星，背景是白色。"),
    # real-style ad captions
    ("商品图。左上角是品牌标志，右下角写着“限时优惠”。", "商品图。右上角是品牌标志，左下角写着“限时优惠”。"),
    ("一双白色运动鞋摆在画面左侧，右侧是鞋盒。", "一双白色运动鞋摆在画面右侧，左侧是鞋盒。"),
    ("售价100元左右的保温杯，左右两侧各有一个把手。", "售价100元左右的保温杯，左右两侧各有一个把手。"),
    ("模特靠左站立，手提一只黑色皮包。", "模特靠右站立，手提一只黑色皮包。"),
    # 左/右 the table does not know: the flip is skipped
    ("模特左手拿着一只红色的包。", None),
    ("路口左转就是我们的门店。", None),
    ("点击鼠标右键保存图片。", None),
])
def test_flip_caption_swaps_known_position_words_or_refuses(caption, flipped):
    assert flip_caption(caption) == flipped
    if flipped is not None:
        assert flip_caption(flipped) == caption  # a flip of the flip is the original


def _image(w=30, h=20):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (200, 60, 40)  # left half reddish, right half bluish
    arr[:, w // 2:] = (40, 80, 180)
    arr[2, 3] = (120, 130, 20)  # an asymmetric marker
    return Image.fromarray(arr)


def test_flip_mirrors_and_scale_jitter_keeps_the_whole_image():
    img = _image()
    flipped = augment_image(img, AugmentConfig(flip_prob=1.0), sample_rng(0, 0, 0), flip=True)
    np.testing.assert_array_equal(np.asarray(flipped), np.asarray(img)[:, ::-1])
    padded = np.asarray(augment_image(img, AugmentConfig(scale_jitter=0.3), sample_rng(0, 0, 1), flip=False))
    original = np.asarray(img)
    assert padded.shape[0] >= original.shape[0] and padded.shape[1] > original.shape[1]
    # the original appears intact somewhere inside; the margin repeats the edge pixels
    found = [(y, x) for y in range(padded.shape[0] - 19) for x in range(padded.shape[1] - 29)
             if np.array_equal(padded[y:y + 20, x:x + 30], original)]
    assert len(found) == 1
    y, x = found[0]
    np.testing.assert_array_equal(padded[y:y + 20, :x], np.repeat(original[:, :1], x, axis=1))


def test_brightness_and_contrast_keep_hue():
    img = _image()
    cfg = AugmentConfig(brightness=0.2, contrast=0.2)
    for index in range(5):
        out = np.asarray(augment_image(img, cfg, sample_rng(1, 0, index), flip=False))
        assert not np.array_equal(out, np.asarray(img))
        for y, x in ((0, 0), (0, 29), (2, 3)):
            before = colorsys.rgb_to_hsv(*(np.asarray(img)[y, x] / 255.0))[0]
            after = colorsys.rgb_to_hsv(*(out[y, x] / 255.0))[0]
            assert abs(before - after) < 0.01, (index, y, x)


def test_config_is_off_by_default_and_checked():
    assert not AugmentConfig().enabled
    assert AugmentConfig(brightness=0.1).enabled
    with pytest.raises(UserError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5).validate()
    with pytest.raises(UserError, match="brightness"):
        AugmentConfig(brightness=1.0).validate()
    from paddle_caption.train.config import TrainConfig

    with pytest.raises(UserError, match="unknown key 'hue'"):
        TrainConfig.from_dict({"model_config": "x", "train_records": "r", "augment": {"hue": 0.1}})


def test_dataset_flips_image_and_caption_together_deterministically(tmp_path, tok, template):  # noqa: F811
    records = write_records(tmp_path)
    records[0]["caption"] = "卡通风格。图片左边是一个红色的圆形，右边是一个蓝色的方形。"
    records[1]["caption"] = "模特左手拿着包。"  # unknown position word: never flipped
    plain = CaptionDataset(records, tok, template, IMAGE_SIZE, MAX_LENGTH)
    always = CaptionDataset(records, tok, template, IMAGE_SIZE, MAX_LENGTH, AugmentConfig(flip_prob=1.0))
    item = always[0]
    answer = tok.decode([t for t in item["labels"] if t >= 0][:-1])
    assert answer == "卡通风格。图片右边是一个红色的圆形，左边是一个蓝色的方形。"
    np.testing.assert_array_equal(item["image"], plain[0]["image"][:, :, ::-1])
    np.testing.assert_array_equal(always[1]["input_ids"], plain[1]["input_ids"])  # skipped flip
    np.testing.assert_array_equal(always[1]["image"], plain[1]["image"])
    # draws are a function of (seed, epoch, index)
    jitter = CaptionDataset(records, tok, template, IMAGE_SIZE, MAX_LENGTH,
                            AugmentConfig(flip_prob=0.5, scale_jitter=0.2, brightness=0.1))
    first = [jitter[i]["image"] for i in range(3)]
    np.testing.assert_array_equal(first[2], jitter[2]["image"])
    jitter.set_epoch(1)
    assert any(not np.array_equal(a, jitter[i]["image"]) for i, a in enumerate(first))
    assert json.dumps(CaptionAugmenter(AugmentConfig(), ["左边"]).flipped) == "[null]"  # flip off: none made
