import json
import pickle

import pytest

from paddle_caption.tokenizer import QWenVLTokenizer, VOCAB_FILE, packaged_vocab_file

CAPTION = "卡通风格。图片中间是一个红色的圆形，背景是白色。"


@pytest.fixture(scope="module")
def tok():
    return QWenVLTokenizer.from_pretrained()


def test_special_token_ids(tok):
    expected = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
        "<|extra_0|>": 151646, "<|extra_204|>": 151850, "<ref>": 151851, "</ref>": 151852,
        "<box>": 151853, "</box>": 151854, "<quad>": 151855, "</quad>": 151856,
        "<img>": 151857, "</img>": 151858, "<imgpad>": 151859,
    }
    for name, token_id in expected.items():
        assert tok.special_token_id(name) == token_id, name
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (151857, 151858, 151859)
    assert tok.pad_id == 151643
    assert tok.vocab_size == 151860 == len(tok.special_tokens) + 151643
    with pytest.raises(KeyError, match="<pad>"):
        tok.special_token_id("<pad>")


def test_qwen_split_pattern(tok):
    # GPT-4's pattern would give [64, 198, 198, 65]; Qwen keeps "\n\n" together.
    assert tok.encode("a\n\nb") == [64, 271, 65]


def test_chinese_round_trip(tok):
    ids = tok.encode(CAPTION)
    assert 0 < len(ids) < len(CAPTION)  # BPE merges Chinese characters
    assert all(i < 151643 for i in ids)
    assert tok.decode(ids) == CAPTION


@pytest.mark.parametrize("text", ["<img>", "</img>", "<imgpad>", "<|im_end|>", "<|endoftext|>",
                                  "图<img>a.jpg</img>文"])
def test_special_strings_in_text_stay_text(tok, text):
    ids = tok.encode(text)
    assert ids and all(i < 151643 for i in ids)
    assert tok.decode(ids) == text


def test_image_span(tok):
    span = tok.image_span()
    assert len(span) == 258
    assert span[0] == 151857 and span[-1] == 151858
    assert set(span[1:-1]) == {151859}


def test_image_span_overrides():
    small = QWenVLTokenizer.from_pretrained(None, n_queries=4, img_start_id=990, img_end_id=991,
                                            img_pad_id=992)
    assert small.image_span() == [990, 992, 992, 992, 992, 991]


def test_decode_specials_and_out_of_range(tok):
    ids = [151644, 64, 151859, 151900, 151935, 65, 151645]
    assert tok.decode(ids) == "<|im_start|>a<imgpad>b<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_save_and_load(tok, tmp_path):
    custom = QWenVLTokenizer.from_pretrained(None, n_queries=8)
    custom.save_pretrained(tmp_path)
    assert (tmp_path / VOCAB_FILE).read_bytes() == packaged_vocab_file().read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["n_queries"] == 8 and config["img_pad_id"] == 151859
    loaded = QWenVLTokenizer.from_pretrained(tmp_path)
    assert loaded.vocab_file == tmp_path / VOCAB_FILE
    assert len(loaded.image_span()) == 10
    assert loaded.encode(CAPTION) == tok.encode(CAPTION)
    # A model directory without its own vocabulary falls back to the packaged one.
    empty = tmp_path / "model_without_vocab"
    empty.mkdir()
    assert QWenVLTokenizer.from_pretrained(empty).vocab_file == packaged_vocab_file()
    with pytest.raises(FileNotFoundError):
        QWenVLTokenizer.from_pretrained(tmp_path / "missing")


def test_cached_load_shares_the_encoding_and_pickles(tok, monkeypatch):
    import paddle_caption.tokenizer as tokenizer_module

    # The BPE ranks are read once per file and process: a second tokenizer reads nothing.
    monkeypatch.setattr(tokenizer_module, "load_bpe_ranks", lambda path: pytest.fail("ranks read again"))
    again = QWenVLTokenizer.from_pretrained()
    assert again._enc is tok._enc
    clone = pickle.loads(pickle.dumps(again))
    assert len(pickle.dumps(again)) < 20_000  # pickled by path, not by 151k ranks
    assert clone.encode(CAPTION) == tok.encode(CAPTION)
