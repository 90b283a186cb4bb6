import json
from pathlib import Path

import numpy as np
import pytest

from paddle_caption.data.prompts import PromptTemplate, read_prompt_file
from paddle_caption.data.samples import build_prompt_ids, build_sample
from paddle_caption.model.config import IGNORE_INDEX
from paddle_caption.resources import packaged_config_dir
from paddle_caption.runtime import UserError
from paddle_caption.tokenizer import QWenVLTokenizer

GOLDEN_IDS = Path(__file__).parent / "fixtures" / "qwen_vl_prompt_golden" / "golden_ids.json"
CAPTION = "卡通风格。图片中间是一个红色的圆形，背景是白色。"
STYLE_PROMPT = (
    "请总结图片的图片风格并描述图片内容。其中图片风格例如：写实风格、图标风格、像素风格、水彩风格、卡通风格、"
    "插画风格、黑白简笔风格、中国风风格、纯文字风格、艺术风格、素描风格、3D风格、科技风格等。图片内容包括："
    "图片中各个主体的特征、主体之间关系和图片背景。注意描述内容需要具有准确性、连贯性和简洁性。"
    "因此该图片的图片风格和描述内容为："
)


@pytest.fixture(scope="module")
def tok():
    return QWenVLTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def template():
    return PromptTemplate.from_files("style_aware.txt")


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN_IDS.read_text(encoding="utf-8"))


def test_prompt_files(tmp_path, monkeypatch):
    PROMPTS_DIR = packaged_config_dir() / "prompts"
    assert (PROMPTS_DIR / "style_aware.txt").read_bytes() == STYLE_PROMPT.encode("utf-8")
    assert (PROMPTS_DIR / "chat_system.txt").read_text(encoding="utf-8").strip() == "You are a helpful assistant."
    template = PromptTemplate.from_files("config/prompts/style_aware.txt")
    assert template == PromptTemplate("You are a helpful assistant.", STYLE_PROMPT)
    with pytest.raises(UserError, match="no_such_prompt.txt"):
        read_prompt_file("no_such_prompt.txt")
    # a file in the working directory wins over the packaged one of the same name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "style_aware.txt").write_text("mine\n", encoding="utf-8")
    assert PromptTemplate.from_files("style_aware.txt").prompt == "mine"
    assert PromptTemplate.from_files("config/prompts/style_aware.txt").prompt == STYLE_PROMPT


def _first_difference(tok, ours, theirs) -> str:
    """Where two id lists part, with both sides decoded, for a readable failure."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return (f"lengths {len(ours)} (ours) vs {len(theirs)} (upstream); first difference at {at}: "
            f"ours {ours[at:at + 3]} {tok.decode(ours[at:at + 3])!r}, "
            f"upstream {theirs[at:at + 3]} {tok.decode(theirs[at:at + 3])!r}")


def test_prompt_and_samples_match_upstream_qwen_vl(tok, template, golden):
    # The golden ids come from upstream Qwen-VL's own tokenizer and make_context (see the fixture's README).
    assert template == PromptTemplate(golden["system"], golden["instruction"])
    special = golden["special_ids"]
    assert (tok.im_start_id, tok.im_end_id, tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (
        special["im_start"], special["im_end"], special["img_start"], special["img_end"], special["img_pad"])

    context = golden["prompt_context_ids"]
    ours = build_prompt_ids(tok, template)
    assert ours == context, _first_difference(tok, ours, context)

    for expected in golden["samples"]:
        sample = build_sample(tok, template, expected["caption"], max_length=2048)
        ids = sample["input_ids"].tolist()
        assert ids == expected["sample_ids"], _first_difference(tok, ids, expected["sample_ids"])
        answer = expected["sample_ids"][len(context):]
        assert answer == expected["caption_ids"] + [special["im_end"]]  # the fixture is self-consistent
        assert sample["labels"].tolist() == [IGNORE_INDEX] * len(context) + answer
    print(f"prompt context: {len(context)} tokens, matches upstream Qwen-VL")


def test_prompt_ids_are_cached_and_safe_to_mutate(tok, template):
    first = build_prompt_ids(tok, template)
    first.append(-1)
    assert build_prompt_ids(tok, template) == first[:-1]


def test_two_images(tok, template):
    ids = build_prompt_ids(tok, template, n_images=2)
    assert ids.count(tok.img_start_id) == 2 and ids.count(tok.img_pad_id) == 512
    assert "\nPicture 2: <img>" in tok.decode([i for i in ids if i != tok.img_pad_id])


def test_label_mask(tok, template):
    sample = build_sample(tok, template, CAPTION, max_length=1024, sample_id="s1")
    input_ids, labels = sample["input_ids"], sample["labels"]
    assert input_ids.dtype == np.int64 and labels.dtype == np.int64 and input_ids.shape == labels.shape
    supervised = labels != IGNORE_INDEX
    decoded = tok.decode(input_ids[supervised])
    print("supervised span:", decoded)
    assert decoded == CAPTION + "<|im_end|>"
    assert np.array_equal(labels[supervised], input_ids[supervised])
    prompt_len = len(build_prompt_ids(tok, template))
    assert not supervised[:prompt_len].any() and supervised[prompt_len:].all()
    assert input_ids[-1] == tok.im_end_id

    # The image span appears exactly once, intact and unsupervised.
    starts = np.flatnonzero(input_ids == tok.img_start_id)
    assert len(starts) == 1 and (input_ids == tok.img_end_id).sum() == 1
    start = starts[0]
    assert np.array_equal(input_ids[start:start + 258], tok.image_span())
    assert (input_ids == tok.img_pad_id).sum() == 256
    assert (labels[start:start + 258] == IGNORE_INDEX).all()

    text = tok.decode(input_ids)
    assert STYLE_PROMPT in text and "You are a helpful assistant." in text
    assert text.endswith("<|im_start|>assistant\n" + CAPTION + "<|im_end|>")


def test_truncation_cuts_only_the_answer(tok, template):
    prompt_len = len(build_prompt_ids(tok, template))
    caption_ids = tok.encode(CAPTION)
    exact = build_sample(tok, template, CAPTION, max_length=prompt_len + len(caption_ids) + 1)
    assert exact["input_ids"][-1] == tok.im_end_id  # fits exactly: nothing cut

    short = build_sample(tok, template, CAPTION, max_length=prompt_len + 5)
    assert len(short["input_ids"]) == prompt_len + 5
    assert short["input_ids"][prompt_len:].tolist() == caption_ids[:5]
    assert tok.im_end_id not in short["input_ids"][prompt_len:]  # no stop taught mid-sentence
    assert short["labels"][prompt_len:].tolist() == caption_ids[:5]
    assert (short["input_ids"] == tok.img_pad_id).sum() == 256

    one = build_sample(tok, template, CAPTION, max_length=prompt_len + 1)
    assert (one["labels"] != IGNORE_INDEX).sum() == 1


def test_prompt_too_long_names_the_sample(tok, template):
    prompt_len = len(build_prompt_ids(tok, template))
    with pytest.raises(ValueError, match="sample ad_00042"):
        build_sample(tok, template, CAPTION, max_length=prompt_len, sample_id="ad_00042")
