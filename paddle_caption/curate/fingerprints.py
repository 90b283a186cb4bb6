"""What the deduplicators compare, computed once per row and kept in its stats for the later ops.

Decode once, hash once: the first image op of a recipe writes every image fingerprint the recipe's
ops need (`image_sha1` of the image file's bytes, `phash_<size>` for each perceptual-hash size asked
for) from one decode; a later op finds them in the row's stats and decodes nothing. Captions are
hashed from their text (`caption_sha1`) and split into jieba words once (cached).

"Identical images" are identical files (the payload's sha1, no decode): a copy re-encoded or with
other metadata is a near duplicate, which the perceptual hash finds. The perceptual hash reads
4 * hash_size pixels a side; the image is decoded at the smallest scale that keeps twice that
(`images.decode_image(decode_side=...)`: a JPEG is scaled in libjpeg's IDCT, 1/2 to 1/8): ~2x less
work than a full decode on the synthetic 300-400 px images, far more on a camera photo. Measured
on the planted near-duplicates of the synthetic world (250 re-encoded, resized copies; hash_size
16): within 8 bits 92% at this scale vs 98% after a full decode, within 4 bits 74% vs 92%; at
4 * hash_size it fell to 70% within 8 bits (docs/curation.md).
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from ..data.images import decode_image
from ..text import jieba_words
from .samples import image_bytes



def phash_key(hash_size: int) -> str:
    return f"phash_{hash_size}"


def image_fingerprints(sample: dict, hash_sizes) -> None:
    """`image_sha1` and `phash_<size>` for each size, into sample["stats"] (those missing only)."""
    stats = sample["stats"]
    missing = [h for h in hash_sizes if phash_key(h) not in stats]
    if "image_sha1" in stats and not missing:
        return
    data = image_bytes(sample)
    if "image_sha1" not in stats:
        stats["image_sha1"] = hashlib.sha1(data).hexdigest()[:24]
    if missing:
        img = decode_image(data, verify=False, decode_side=8 * max(missing), color="L")
        for size in missing:
            stats[phash_key(size)] = phash(img, size)


@lru_cache(maxsize=8)
def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first k rows of the (unnormalised) DCT-II matrix of size n, scipy.fftpack.dct's."""
    i = np.arange(n)
    return 2 * np.cos(np.pi * np.outer(np.arange(k), 2 * i + 1) / (2 * n))


def phash(gray, hash_size: int, resample=None) -> str:
    """imagehash.phash's hash (resize to 4*hash_size square, 2-D DCT, the hash_size**2 lowest
    frequencies against their median) as its hex string, with the DCT as two small matrix products
    (~4x faster than imagehash's full scipy DCT). With `resample=Image.LANCZOS` (imagehash's) the
    bits are imagehash's but for a rare tie at the median (tested); the default, bilinear (PIL's
    antialiased one when shrinking), is ~2.5x faster than LANCZOS and found exactly as many of the
    synthetic world's 250 planted near-duplicates (92% within 8 bits, 76% within 4)."""
    from PIL import Image

    n = 4 * hash_size
    pixels = np.asarray(gray.resize((n, n), Image.BILINEAR if resample is None else resample), dtype=np.float64)
    d = _dct_rows(n, hash_size)
    low = d @ pixels @ d.T
    bits = (low > np.median(low)).flatten()
    if bits.size % 8 == 0:
        return np.packbits(bits).tobytes().hex()
    return format(int("".join("1" if b else "0" for b in bits), 2), f"0{-(-bits.size // 4)}x")


def caption_sha1(sample: dict) -> str:
    stats = sample["stats"]
    if "caption_sha1" not in stats:
        stats["caption_sha1"] = hashlib.sha1(sample["caption"].strip().encode()).hexdigest()[:24]
    return stats["caption_sha1"]


def phash_words(hex_hash: str, hash_size: int) -> np.ndarray:
    """A phash as uint64 words (most significant first), for vectorised Hamming distances."""
    bits = hash_size * hash_size
    n_words = -(-bits // 64)
    value = int(hex_hash, 16)
    return np.array([(value >> (64 * (n_words - 1 - i))) & (2 ** 64 - 1) for i in range(n_words)], dtype=np.uint64)


@lru_cache(maxsize=16384)  # ~3.6 kB an entry (measured): bounded at ~60 MB whatever the row count
def word_grams(caption: str, n: int) -> frozenset:
    """The caption's jieba-word n-grams (the whole caption when it has fewer than n words)."""
    words = jieba_words(caption)
    return frozenset(" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1)))


def jaccard(a: str, b: str, n: int) -> float:
    """Exact Jaccard similarity of two captions' word n-gram sets."""
    ga, gb = word_grams(a.strip(), n), word_grams(b.strip(), n)
    union = len(ga | gb)
    return len(ga & gb) / union if union else 1.0
