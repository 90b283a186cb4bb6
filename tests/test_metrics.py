"""Metrics against hand-computed values (arithmetic spelled out) and basic properties."""
import math
import subprocess
import sys

import pytest

from paddle_caption.eval.caption_scores import (bleu, cider_d, cider_length_penalty, lcs_length, rouge_l,
                                         score_captions, tokenize)

TINY, SMALL = 1e-15, 1e-9  # pycocoevalcap's BLEU epsilons

# A 2-image corpus: image 1 has two references, image 2 one.
CANDS = {"1": "a b c d".split(), "2": "x y".split()}
REFS = {"1": ["a b c e".split(), "a b".split()], "2": ["x y z".split()]}


def test_bleu_hand_computed():
    # Image 1, candidate a b c d (len 4); clipping counts are the max over both references.
    #   1-grams a,b,c match (d does not): correct 3 / guess 4
    #   2-grams ab,bc match (cd does not): 2 / 3
    #   3-grams abc matches (bcd does not): 1 / 2
    #   4-gram  abcd does not match abce: 0 / 1
    #   closest reference length to 4 among {4, 2}: 4
    # Image 2, candidate x y (len 2) vs x y z:
    #   1-grams 2 / 2, 2-grams 1 / 1, 3-grams 0 / 0, 4-grams 0 / 0, reference length 3
    # Corpus: correct = [5, 3, 1, 0], guess = [6, 4, 2, 1], test length 6, reference length 7.
    correct, guess = [5, 3, 1, 0], [6, 4, 2, 1]
    ratio = (6 + TINY) / (7 + SMALL)
    brevity = math.exp(1 - 1 / ratio)  # about exp(-1/6), since 6 < 7
    expected = []
    for n in range(1, 5):
        prod = math.prod((correct[k] + TINY) / (guess[k] + SMALL) for k in range(n))
        expected.append(prod ** (1 / n) * brevity)
    got = bleu(CANDS, REFS)
    assert got == pytest.approx(expected, rel=1e-12)
    # Sanity of the hand numbers: BLEU-1 = 5/6 * exp(-1/6), BLEU-2 = sqrt(5/6 * 3/4) * exp(-1/6).
    assert got[0] == pytest.approx(5 / 6 * math.exp(-1 / 6), rel=1e-9)
    assert got[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 4) * math.exp(-1 / 6), rel=1e-9)
    # No 4-gram matched: pycocoevalcap's tiny epsilon gives ~1e-4, not 0.
    assert 0 < got[3] < 1e-3


def test_bleu_closest_reference_tie_goes_to_shorter():
    # Candidate length 3, references of length 2 and 4 are equally close: the shorter (2) is used,
    # so there is no brevity penalty (3 > 2), and BLEU-1 = 2/3 (p, q match; r does not).
    got = bleu({"1": "p q r".split()}, {"1": ["p q".split(), "p q s t".split()]})
    assert got[0] == pytest.approx((2 + TINY) / (3 + SMALL), rel=1e-12)


def test_rouge_l_hand_computed():
    beta2 = 1.2 ** 2
    # Image 1: vs "a b c e": LCS 3 -> P 3/4, R 3/4; vs "a b": LCS 2 -> P 2/4, R 2/2.
    #   max P = 3/4 (first ref), max R = 1 (second ref) -> F = (1 + b^2) P R / (R + b^2 P)
    f1 = (1 + beta2) * 0.75 * 1.0 / (1.0 + beta2 * 0.75)  # = 1.83 / 2.08
    # Image 2: vs "x y z": LCS 2 -> P 1, R 2/3.
    f2 = (1 + beta2) * 1.0 * (2 / 3) / ((2 / 3) + beta2 * 1.0)
    mean, per_image = rouge_l(CANDS, REFS)
    assert per_image["1"] == pytest.approx(1.83 / 2.08, rel=1e-12)
    assert per_image["1"] == pytest.approx(f1, rel=1e-12)
    assert per_image["2"] == pytest.approx(f2, rel=1e-12)
    assert mean == pytest.approx((f1 + f2) / 2, rel=1e-12)


def test_lcs_length():
    assert lcs_length("a b c d e".split(), "a c e x".split()) == 3
    assert lcs_length([], "a".split()) == 0


def test_cider_d_hand_computed():
    # 3 images, so idf = log(3) - log(max(1, df)), with df counted over each image's reference set.
    cands = {"1": "a a b".split(), "2": ["a"], "3": ["d"]}
    refs = {"1": ["a b".split(), "a c".split()], "2": [["a"]], "3": [["e"]]}
    L, l2 = math.log(3), math.log(2)
    # df: "a" occurs in the references of images 1 and 2 -> idf(a) = L - log 2; every other n-gram
    # occurs in at most one image (or none, like "a a" and "d") -> idf = L.
    #
    # Image 1, candidate "a a b": 1-grams a:2, b:1 -> weights 2(L-l2), L; 2-grams aa, ab -> L, L;
    # 3-gram aab -> L. Bigram count (pycocoevalcap's "length") 2.
    norm1_h = math.sqrt(4 * (L - l2) ** 2 + L ** 2)
    #  Ref "a b": 1-grams (L-l2), L; 2-gram ab: L; bigram count 1 -> delta 1.
    #    n=1: clipped a: min(2(L-l2), L-l2) * (L-l2) + b: L * L, over the norms
    norm_ab = math.sqrt((L - l2) ** 2 + L ** 2)
    v1_n1 = ((L - l2) ** 2 + L ** 2) / (norm1_h * norm_ab)
    #    n=2: only ab matches: L*L / (sqrt(2) L * L) = 1/sqrt(2); n=3, 4: reference norm 0 -> 0
    v1_n2 = 1 / math.sqrt(2)
    #  Ref "a c": n=1: only "a" matches -> (L-l2)^2 / (norm1_h * |(L-l2, L)|); n=2: no match.
    v2_n1 = (L - l2) ** 2 / (norm1_h * norm_ab)
    penalty = math.exp(-1 / 72)  # both references have 1 bigram vs the candidate's 2
    img1 = 10 * ((v1_n1 + v1_n2) * penalty + v2_n1 * penalty) / 4 / 2  # mean over n, over 2 refs
    # Image 2, "a" vs "a": unigram cosine 1, n=2..4 all 0 -> 10 * 1/4 = 2.5.
    img2 = 2.5
    # Image 3, "d" vs "e": nothing in common -> 0.
    expected = (img1 + img2 + 0.0) / 3
    mean, per_image = cider_d(cands, refs)
    assert per_image["1"] == pytest.approx(img1, rel=1e-12)
    assert per_image["1"] == pytest.approx(2.05566, abs=1e-5)  # the same, evaluated by hand
    assert per_image["2"] == pytest.approx(2.5, rel=1e-12)
    assert per_image["3"] == 0.0
    assert mean == pytest.approx(expected, rel=1e-12)


def test_cider_d_perfect_match_scores_ten_when_references_differ():
    refs = {"a": ["卡通风格。图片中间是一个红色的圆形，背景是白色。"],
            "b": ["水彩风格。图片左边是一个蓝色的五角星，右边是一个黄色的菱形，背景是米色。"]}
    preds = {k: v[0] for k, v in refs.items()}
    scores = score_captions(preds, refs)
    # Shared words (图片, 是, ...) get idf 0, but every n-gram cosine is still exactly 1.
    assert scores["CIDEr-D"] == pytest.approx(10.0, rel=1e-12)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-8)
    assert scores["ROUGE-L"] == pytest.approx(1.0, rel=1e-12)
    assert scores["n"] == 2


def test_cider_d_single_image_corpus_is_zero():
    # idf = log(1) - log(1) = 0 for everything: pycocoevalcap gives 0 for a one-image corpus.
    assert cider_d({"1": "a b".split()}, {"1": ["a b".split()]})[0] == 0.0


def test_cider_d_length_penalty_sigma_6():
    assert cider_length_penalty(3) == pytest.approx(math.exp(-9 / 72), rel=1e-15)
    cands = {"1": "a b c d e f g".split(), "2": "u v w".split()}
    refs = {"1": ["a b c d".split()], "2": ["u v w".split()]}
    _, with_penalty = cider_d(cands, refs)
    _, without = cider_d(cands, refs, sigma=1e12)
    # Candidate 1 is 3 words longer than its reference: the penalty is exp(-3^2 / 72).
    assert with_penalty["1"] == pytest.approx(without["1"] * math.exp(-9 / 72), rel=1e-12)
    assert with_penalty["2"] == pytest.approx(without["2"], rel=1e-12)


def test_identical_captions_give_bleu_and_rouge_one():
    refs = {"1": ["the cat sat on the mat".split()], "2": ["a red circle on white".split()]}
    cands = {k: v[0] for k, v in refs.items()}
    assert bleu(cands, refs) == pytest.approx([1.0] * 4, abs=1e-8)
    assert rouge_l(cands, refs)[0] == 1.0


def test_empty_candidates_score_zero_without_crashing():
    refs = {"1": ["卡通风格。图片中间是一个红色的圆形。"], "2": ["像素风格。图片中间是一个绿色的菱形。"]}
    scores = score_captions({"1": "", "2": "。"}, refs)
    assert scores["CIDEr-D"] == 0.0
    assert scores["ROUGE-L"] == 0.0
    assert all(scores[f"BLEU-{n}"] < 1e-12 for n in range(1, 5))
    # One empty candidate among good ones only pulls the mean down.
    mixed = score_captions({"1": refs["1"][0], "2": ""}, refs)
    assert mixed["ROUGE-L"] == pytest.approx(0.5)


def test_multiple_references_and_char_mode():
    refs = {"1": ["红色的圆形", "蓝色的圆形"], "2": ["白色背景", "黑色背景"]}
    preds = {"1": "蓝色的圆形", "2": "黑色背景"}
    scores = score_captions(preds, refs, mode="char")
    # Every prediction equals one of its references character for character.
    assert scores["ROUGE-L"] == 1.0
    assert scores["BLEU-1"] == pytest.approx(1.0, abs=1e-8)


def test_mismatched_ids_raise():
    with pytest.raises(ValueError, match="ids differ"):
        score_captions({"1": "x"}, {"2": ["x"]})


def test_tokenize_drops_punctuation_and_whitespace():
    text = "卡通风格。图片中间是一个红色的圆形，背景是白色！ "
    assert tokenize(text) == ["卡通", "风格", "图片", "中间", "是", "一个", "红色", "的", "圆形",
                              "背景", "是", "白色"]
    assert "。" in tokenize(text, drop_punct=False)
    assert tokenize("a,b. c", mode="char") == ["a", "b", "c"]
    assert tokenize("3D风格", mode="char") == ["3", "D", "风", "格"]
    with pytest.raises(ValueError, match="unknown tokenisation mode"):
        tokenize("x", mode="words")


def test_jieba_initialises_quietly():
    code = "from paddle_caption.eval.caption_scores import tokenize; print(tokenize('图片中间是一个圆形'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert "圆形" in proc.stdout
