"""Deduplication: identical images (hash of the decoded pixels), near-identical images (perceptual
hash within a Hamming distance, `imagehash`), identical captions, near-identical captions (MinHash
over jieba words, `datasketch` LSH).

The first occurrence is kept; a later one is dropped with the id it repeats (`duplicate_of`). Rows
that point at the same image row (the references of one multi-caption image) are not duplicates of
each other by image. Memory: one hash per kept row (like the converter's seen-id set), the only
state that grows with the data; the hashes themselves are written to the stats file.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import numpy as np

from ...runtime import UserError
from ...text import jieba_words
from ..samples import load_image
from .base import Op, register


MINHASH_SCHEME = "affine32"  # datasketch 2.x's default: 32-bit hash values (stored as uint32)


class Deduplicator(Op):
    key_stat = ""

    def select(self, read):
        self.kept_rows = 0
        for sample in read():
            original = self.find(sample)
            if original is not None:
                sample["stats"]["duplicate_of"] = original
                yield sample, self.reason
            else:
                self.remember(sample)
                yield sample, None

    def score(self, sample):
        return sample["stats"].get(self.stat)


def _image_key(sample) -> tuple:
    return (sample["tsv"], sample["offset"])


@dataclass
class NoParams:
    pass


@register
class ImageExactDedup(Deduplicator):
    """Identical decoded pixels (size, mode and every byte): a re-encoded copy of a JPEG is not
    identical — that is the near-duplicate op's job."""

    name = "image_exact_dedup"
    Params = NoParams
    reason = "duplicate_image"

    def compute_stats(self, sample):
        img = load_image(sample)
        digest = hashlib.sha1(f"{img.size}{img.mode}".encode() + img.tobytes()).hexdigest()[:24]
        sample["stats"]["image_sha1"] = digest

    def select(self, read):
        self.seen: dict[str, tuple] = {}
        yield from super().select(read)

    def find(self, sample):
        hit = self.seen.get(sample["stats"]["image_sha1"])
        return hit[1] if hit is not None and hit[0] != _image_key(sample) else None

    def remember(self, sample):
        self.seen.setdefault(sample["stats"]["image_sha1"], (_image_key(sample), sample["id"]))


@dataclass
class NearImageParams:
    hamming: int = 6  # at most this many of the hash's bits may differ
    hash_size: int = 8  # phash side: hash_size**2 bits

    def validate(self, where):
        if not 0 <= self.hamming < self.hash_size ** 2 or self.hash_size < 4:
            raise UserError(f"{where}: need hash_size >= 4 and 0 <= hamming < hash_size**2")


@register
class ImageNearDedup(Deduplicator):
    """Perceptual hash (imagehash.phash: the DCT's low frequencies) within `hamming` bits.

    Lookup: the hash is cut into hamming + 1 bands; two hashes within `hamming` bits agree
    exactly on at least one band (pigeonhole), so only rows sharing a band are compared.
    """

    name = "image_near_dedup"
    Params = NearImageParams
    reason = "near_duplicate_image"
    stat = "phash_distance"

    def compute_stats(self, sample):
        import imagehash

        sample["stats"]["phash"] = str(imagehash.phash(load_image(sample), hash_size=self.params.hash_size))

    def select(self, read):
        bits = self.params.hash_size ** 2
        self.n_bands = self.params.hamming + 1
        self.band_edges = [int(x) for x in np.linspace(0, bits, self.n_bands + 1)]
        self.index: dict[tuple, list] = {}
        yield from super().select(read)

    def _bands(self, value: int):
        bits = self.params.hash_size ** 2
        for b in range(self.n_bands):
            lo, hi = self.band_edges[b], self.band_edges[b + 1]
            yield (b, (value >> (bits - hi)) & ((1 << (hi - lo)) - 1))

    def find(self, sample):
        value = int(sample["stats"]["phash"], 16)
        best = None
        for band in self._bands(value):
            for other, key, row_id in self.index.get(band, ()):
                distance = bin(value ^ other).count("1")
                if distance <= self.params.hamming and key != _image_key(sample) and (best is None or distance < best[0]):
                    best = (distance, row_id)
        if best is None:
            return None
        sample["stats"]["phash_distance"] = best[0]
        return best[1]

    def remember(self, sample):
        value = int(sample["stats"]["phash"], 16)
        for band in self._bands(value):
            self.index.setdefault(band, []).append((value, _image_key(sample), sample["id"]))


@register
class CaptionExactDedup(Deduplicator):
    """The same caption text (surrounding whitespace ignored)."""

    name = "caption_exact_dedup"
    Params = NoParams
    reason = "duplicate_caption"

    def compute_stats(self, sample):
        sample["stats"]["caption_sha1"] = hashlib.sha1(sample["caption"].strip().encode()).hexdigest()[:24]

    def select(self, read):
        self.seen: dict[str, str] = {}
        yield from super().select(read)

    def find(self, sample):
        return self.seen.get(sample["stats"]["caption_sha1"])

    def remember(self, sample):
        self.seen.setdefault(sample["stats"]["caption_sha1"], sample["id"])


@dataclass
class NearCaptionParams:
    jaccard: float = 0.8  # estimated Jaccard similarity of the word n-gram sets at or above which rows are near-duplicates
    ngram: int = 2  # jieba-word n-grams
    num_perm: int = 128

    def validate(self, where):
        if not 0 < self.jaccard <= 1 or self.ngram < 1 or self.num_perm < 16:
            raise UserError(f"{where}: need 0 < jaccard <= 1, ngram >= 1, num_perm >= 16")


@register
class CaptionNearDedup(Deduplicator):
    """MinHash over jieba word n-grams; candidates from datasketch's LSH, then the estimated
    Jaccard similarity is checked against the threshold."""

    name = "caption_near_dedup"
    Params = NearCaptionParams
    reason = "near_duplicate_caption"
    stat = "caption_jaccard"
    transient = ("minhash",)

    def _minhash(self, caption: str):
        from datasketch import MinHash

        words = jieba_words(caption)
        n = self.params.ngram
        grams = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
        m = MinHash(num_perm=self.params.num_perm, seed=1, scheme=MINHASH_SCHEME)
        m.update_batch([g.encode("utf-8") for g in grams])
        return m

    def compute_stats(self, sample):
        values = self._minhash(sample["caption"]).hashvalues.astype(np.uint32)
        sample["stats"]["minhash"] = base64.b64encode(values.tobytes()).decode("ascii")

    def _load(self, sample):
        from datasketch import MinHash

        values = np.frombuffer(base64.b64decode(sample["stats"]["minhash"]), dtype=np.uint32)
        return MinHash(num_perm=self.params.num_perm, seed=1, hashvalues=values, scheme=MINHASH_SCHEME)

    def select(self, read):
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=self.params.jaccard, num_perm=self.params.num_perm)
        self.hashes: dict[str, object] = {}
        self.n = 0
        yield from super().select(read)

    def find(self, sample):
        m = self._load(sample)
        best = None
        for key in self.lsh.query(m):
            similarity = m.jaccard(self.hashes[key][0])
            if similarity >= self.params.jaccard and (best is None or similarity > best[0]):
                best = (similarity, self.hashes[key][1])
        if best is None:
            return None
        sample["stats"]["caption_jaccard"] = round(best[0], 4)
        return best[1]

    def remember(self, sample):
        m = self._load(sample)
        key = str(self.n)
        self.n += 1
        self.lsh.insert(key, m)
        self.hashes[key] = (m, sample["id"])
