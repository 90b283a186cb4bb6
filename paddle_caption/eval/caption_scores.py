"""Caption metrics computed the way pycocoevalcap computes them: CIDEr-D, BLEU-1..4, ROUGE-L.

The contest scores jieba-segmented Chinese with the coco-caption scorers, so the numbers here must
match those scorers, quirks included:

* CIDEr-D (vrama91's `ciderD_scorer`, df_mode="corpus"): n-grams 1..4, tf-idf vectors whose
  document frequencies come from the references of the scored corpus, idf = log(#images) -
  log(max(1, df)); the candidate's weights are clipped by the reference's (min(hyp, ref)); a
  Gaussian length penalty exp(-delta^2 / (2 sigma^2)) with sigma = 6, where the "length" is the
  number of *bigrams* (pycocoevalcap counts `n == 1`, the 0-based bigram index; for non-empty
  sentences the difference equals the word-count difference); mean over n, mean over references,
  times 10. A perfect match of a distinctive caption therefore scores about 10.
* BLEU (`bleu_scorer`, option="closest"): clipped n-gram matches and guesses summed over the
  corpus, the closest reference length per image (ties go to the shorter one), one corpus-level
  brevity penalty, and the scorer's epsilons tiny = 1e-15, small = 1e-9.
* ROUGE-L (`rouge.py`): LCS-based, beta = 1.2; per image, the maximum precision and the maximum
  recall over the references (possibly from different references) are combined into F, then F is
  averaged over images.

Tokenisation replaces coco-caption's PTBTokenizer: Chinese is segmented by jieba precise mode and,
like PTBTokenizer, punctuation tokens are dropped. `mode="char"` scores characters instead.
"""
from __future__ import annotations

import math
import unicodedata
from collections import Counter
from typing import Mapping, Sequence

from ..text import jieba_cut

Tokens = Sequence[str]

MAX_N = 4
CIDER_SIGMA = 6.0
ROUGE_BETA = 1.2
# bleu_scorer.py's guards: `tiny` keeps a zero-match precision at exactly ~0 instead of 0/0, `small`
# keeps an empty corpus from dividing by zero.
BLEU_TINY = 1e-15
BLEU_SMALL = 1e-9
MODES = ("jieba", "char")


# ---------------------------------------------------------------------------------------------
# Tokenisation


def is_punctuation(token: str) -> bool:
    """True for a token made only of punctuation (Unicode category P*: 。，、：；！？,.:;!?“”（）…—)."""
    return bool(token) and all(unicodedata.category(ch).startswith("P") for ch in token)


def tokenize(text: str, mode: str = "jieba", drop_punct: bool = True) -> list[str]:
    """Split a caption into tokens: jieba precise-mode words or single characters.

    Whitespace tokens are always dropped; punctuation tokens are dropped when `drop_punct`, as
    PTBTokenizer drops punctuation before coco-caption scores English.
    """
    if mode == "jieba":
        pieces = jieba_cut(text)
    elif mode == "char":
        pieces = list(text)
    else:
        raise ValueError(f"unknown tokenisation mode {mode!r}; expected one of {MODES}")
    tokens = []
    for piece in pieces:
        piece = piece.strip()
        if not piece or (drop_punct and is_punctuation(piece)):
            continue
        # jieba can return "a b" for runs of Latin text; the coco scorers split on whitespace.
        tokens.extend(piece.split())
    return tokens


# ---------------------------------------------------------------------------------------------
# Shared helpers


def ngram_counts(tokens: Tokens, max_n: int = MAX_N) -> Counter:
    """Counts of every n-gram (as a tuple) for n = 1..max_n."""
    counts: Counter = Counter()
    for k in range(1, max_n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i:i + k])] += 1
    return counts


def _check_corpus(candidates: Mapping[str, Tokens], references: Mapping[str, Sequence[Tokens]]):
    if set(candidates) != set(references):
        missing = sorted(set(references) - set(candidates))
        extra = sorted(set(candidates) - set(references))
        raise ValueError(f"candidate and reference ids differ: {len(missing)} without a candidate "
                         f"{missing[:3]}, {len(extra)} without references {extra[:3]}")
    if not references:
        raise ValueError("cannot score an empty corpus")
    for key, refs in references.items():
        if len(refs) == 0:
            raise ValueError(f"id {key!r} has no reference caption")
    return list(references)


# ---------------------------------------------------------------------------------------------
# CIDEr-D


def document_frequencies(references: Mapping[str, Sequence[Tokens]], max_n: int = MAX_N) -> tuple[Counter, int]:
    """(in how many images' reference sets each n-gram occurs, the number of images): CIDEr-D's idf
    statistics of a corpus. SCST (train/scst.py) computes them once from the training references
    and scores every sampled caption against them (`cider_d(..., doc_freq=...)`)."""
    doc_freq: Counter = Counter()
    for refs in references.values():
        doc_freq.update(set().union(*(ngram_counts(r, max_n) for r in refs)))
    return doc_freq, len(references)


def cider_d(candidates: Mapping[str, Tokens], references: Mapping[str, Sequence[Tokens]],
            max_n: int = MAX_N, sigma: float = CIDER_SIGMA,
            doc_freq: tuple[Counter, int] | None = None) -> tuple[float, dict[str, float]]:
    """Corpus CIDEr-D and the per-image scores, from pre-tokenised captions. `doc_freq` (from
    `document_frequencies`) replaces the scored corpus's own idf statistics (coco-caption's
    df_mode other than "corpus")."""
    ids = _check_corpus(candidates, references)
    ref_counts = {i: [ngram_counts(r, max_n) for r in references[i]] for i in ids}

    # Document frequency: in how many images' reference sets an n-gram occurs.
    doc_freq, num_images = doc_freq or document_frequencies({i: references[i] for i in ids}, max_n)
    log_num_images = math.log(float(num_images))

    def tfidf(counts: Counter):
        vec = [{} for _ in range(max_n)]
        norm = [0.0] * max_n
        n_bigrams = 0
        for ngram, tf in counts.items():
            n = len(ngram) - 1
            weight = float(tf) * (log_num_images - math.log(max(1.0, doc_freq[ngram])))
            vec[n][ngram] = weight
            norm[n] += weight * weight
            if n == 1:  # pycocoevalcap's "length" is the bigram count (see module docstring)
                n_bigrams += tf
        return vec, [math.sqrt(x) for x in norm], n_bigrams

    def similarity(hyp, ref) -> list[float]:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        penalty = math.exp(-float(len_h - len_r) ** 2 / (2 * sigma ** 2))
        vals = []
        for n in range(max_n):
            val = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec_h[n].items())
            if norm_h[n] != 0 and norm_r[n] != 0:
                val /= norm_h[n] * norm_r[n]
            vals.append(val * penalty)
        return vals

    per_image = {}
    for i in ids:
        hyp = tfidf(ngram_counts(candidates[i], max_n))
        summed = [0.0] * max_n
        for counts in ref_counts[i]:
            for n, v in enumerate(similarity(hyp, tfidf(counts))):
                summed[n] += v
        per_image[i] = sum(summed) / max_n / len(ref_counts[i]) * 10.0
    return sum(per_image.values()) / len(ids), per_image


def cider_length_penalty(delta: float, sigma: float = CIDER_SIGMA) -> float:
    """CIDEr-D's Gaussian length penalty; with sigma = 6 it is exp(-delta^2 / 72)."""
    return math.exp(-(delta ** 2) / (2 * sigma ** 2))


# ---------------------------------------------------------------------------------------------
# BLEU


def bleu(candidates: Mapping[str, Tokens], references: Mapping[str, Sequence[Tokens]],
         max_n: int = MAX_N) -> list[float]:
    """Corpus BLEU-1..max_n as pycocoevalcap's `compute_score(option="closest")`."""
    ids = _check_corpus(candidates, references)
    correct = [0] * max_n
    guess = [0] * max_n
    test_len = 0
    ref_len = 0
    for i in ids:
        hyp = candidates[i]
        max_ref_counts: Counter = Counter()
        for ref in references[i]:
            max_ref_counts |= ngram_counts(ref, max_n)  # Counter union keeps the max count
        for ngram, count in ngram_counts(hyp, max_n).items():
            correct[len(ngram) - 1] += min(max_ref_counts.get(ngram, 0), count)
        for k in range(max_n):
            guess[k] += max(0, len(hyp) - k)
        test_len += len(hyp)
        # Closest reference length; on a tie the shorter reference wins (min over (distance, length)).
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in references[i])[1]

    ratio = (test_len + BLEU_TINY) / (ref_len + BLEU_SMALL)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores = []
    product = 1.0
    for n in range(1, max_n + 1):
        product *= (correct[n - 1] + BLEU_TINY) / (guess[n - 1] + BLEU_SMALL)
        scores.append(product ** (1.0 / n) * brevity)
    return scores


# ---------------------------------------------------------------------------------------------
# ROUGE-L


def lcs_length(a: Tokens, b: Tokens) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_single(candidate: Tokens, refs: Sequence[Tokens], beta: float = ROUGE_BETA) -> float:
    """ROUGE-L F of one candidate: max precision and max recall over the references, then F.

    An empty candidate or reference contributes precision/recall 0 (pycocoevalcap would split ""
    into [""] and reach the same 0, except for the degenerate empty-vs-empty pair).
    """
    precisions, recalls = [], []
    for ref in refs:
        lcs = lcs_length(ref, candidate)
        precisions.append(lcs / len(candidate) if candidate else 0.0)
        recalls.append(lcs / len(ref) if ref else 0.0)
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def rouge_l(candidates: Mapping[str, Tokens], references: Mapping[str, Sequence[Tokens]],
            beta: float = ROUGE_BETA) -> tuple[float, dict[str, float]]:
    """Mean ROUGE-L over images and the per-image scores."""
    ids = _check_corpus(candidates, references)
    per_image = {i: rouge_l_single(candidates[i], references[i], beta) for i in ids}
    return sum(per_image.values()) / len(ids), per_image


# ---------------------------------------------------------------------------------------------
# Public entry point


def score_tokens(candidates: Mapping[str, Tokens], references: Mapping[str, Sequence[Tokens]]) -> dict:
    """All contest metrics from pre-tokenised captions, as plain floats."""
    cider, _ = cider_d(candidates, references)
    bleus = bleu(candidates, references)
    rouge, _ = rouge_l(candidates, references)
    scores = {"CIDEr-D": float(cider)}
    scores.update({f"BLEU-{n}": float(b) for n, b in enumerate(bleus, start=1)})
    scores["ROUGE-L"] = float(rouge)
    scores["n"] = len(references)
    return scores


def score_captions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   mode: str = "jieba", drop_punct: bool = True) -> dict:
    """Score caption strings: keys CIDEr-D, BLEU-1..4, ROUGE-L (floats) and n (number of images).

    `references` maps each id to one or more reference captions (MUGE style).
    """
    cands = {i: tokenize(text, mode, drop_punct) for i, text in predictions.items()}
    refs = {i: [tokenize(text, mode, drop_punct) for text in texts] for i, texts in references.items()}
    return score_tokens(cands, refs)
