"""Deduplication: identical images (decoded pixels), near-identical images (perceptual hash within a
Hamming distance, `imagehash`), identical captions, near-identical captions (MinHash LSH over jieba
word n-grams, checked by their exact Jaccard similarity).

**Duplicates are pairs** (`"match": "pair"`, the default of every op): a row is a duplicate of an
earlier kept row only when both its image and its caption are (near-)identical to that row's. Ad
captions are formulaic, so different images legitimately share a caption ("卡通风格。图片中间是一个
红色的圆形，背景是白色。"), and an image with a different caption is a second reference of it: both
are kept as rows (see docs/curation.md for why rows and not a merged multi-reference record). The
one-sided modes stay available by name: `"match": "image"` for the image ops (the image alone
decides), `"match": "caption"` for the caption ops (data-juicer's text deduplicator: on the
synthetic ad world it drops three quarters of the clean rows; docs/curation.md).

The first occurrence is kept; a later one is dropped with the id it repeats (`duplicate_of`). In
`image` mode, rows that point at the same image row (the references of one multi-caption image)
are not duplicates of each other. Memory: compact numpy indexes (`..index`), no Python object per
row; fingerprints are computed once per row and reused by the later ops (`..fingerprints`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...runtime import UserError
from ..fingerprints import caption_sha1, image_fingerprints, jaccard, phash_key, phash_words, word_grams
from ..index import BandIndex, Column, Strings, hash64, popcount64
from .base import Op, register


MINHASH_SCHEME = "affine32"  # datasketch 2.x's default: 32-bit hash values


def _image_key(sample) -> int:
    return hash64(f"{sample['tsv']}\0{sample['offset']}".encode())


@dataclass
class PairParams:
    """How the other half of a pair is compared (used in "pair" mode only)."""

    match: str = "pair"
    caption_jaccard: float = 0.8  # word n-gram Jaccard at or above which two captions are near-identical
    image_hamming: int = 8  # phash bits (of image_hash_size**2) within which two images are near-identical
    image_hash_size: int = 16
    ngram: int = 2  # jieba-word n-grams of the caption comparison

    modes = ("pair",)

    def validate(self, where):
        if self.match not in self.modes:
            raise UserError(f"{where}: match must be one of {', '.join(self.modes)}, not {self.match!r}")
        if not 0 < self.caption_jaccard <= 1 or self.ngram < 1:
            raise UserError(f"{where}: need 0 < caption_jaccard <= 1 and ngram >= 1")
        if self.image_hash_size < 4 or not 0 <= self.image_hamming < self.image_hash_size ** 2:
            raise UserError(f"{where}: need image_hash_size >= 4 and 0 <= image_hamming < image_hash_size**2")


class Deduplicator(Op):
    """Keeps first occurrences. A subclass finds candidate earlier rows in its own index (`candidates`);
    `pairs` checks the other side of the pair."""

    transient = ()
    shardable = True
    primary = ""  # "image" or "caption": what the op's own index compares

    @property
    def pair(self) -> bool:
        return self.params.match == "pair"

    def hash_sizes(self) -> set[int]:
        """The phash sizes this op reads (computed together with the other image ops', `plan`)."""
        sizes = {self.params.hash_size} if self.primary == "image" and hasattr(self.params, "hash_size") else set()
        if self.pair and self.primary == "caption":
            sizes.add(self.params.image_hash_size)
        return sizes

    def plan(self, ops) -> None:
        """Decode once: this op computes the image fingerprints every dedup op of the recipe needs."""
        self.all_sizes = set().union(*(op.hash_sizes() for op in ops if isinstance(op, Deduplicator)))

    def needs_image(self) -> bool:
        return self.primary == "image" or self.pair

    def compute_stats(self, sample):
        if self.needs_image():
            image_fingerprints(sample, sorted(getattr(self, "all_sizes", None) or self.hash_sizes()))
        caption_sha1(sample)

    def select(self, read):
        self.ids, self.captions = Strings(), Strings()
        self.image_keys, self.caption_keys = Column(np.uint64), Column(np.uint64)
        self.other_phash = Column(np.uint64, -(-self.params.image_hash_size ** 2 // 64)) \
            if self.pair and self.primary == "caption" else None
        self.start()
        for sample in read():
            original = self.find(sample)
            if original is not None:
                sample["stats"]["duplicate_of"] = self.ids[original]
                yield sample, self.reason
                continue
            row = self.ids.append(sample["id"])
            if self.primary == "image" and not self.pair:
                self.image_keys.append(_image_key(sample))
            self.caption_keys.append(hash64(caption_sha1(sample).encode()))
            if self.keeps_captions():
                self.captions.append(sample["caption"].strip())
            if self.other_phash is not None:
                self.other_phash.append(self._other_phash(sample))
            self.remember(sample, row)
            yield sample, None
        self.index.flush()
        self.info["index_bytes"] = self.index_bytes()
        self.info["rule"] = self.rule()
        # the ops live as long as the run: free the index now, not after the last stage
        self.ids = self.captions = self.image_keys = self.caption_keys = self.other_phash = self.index = None
        self.hashes = None

    def rule(self) -> str:
        """What made a row a duplicate here, for the report."""
        p = self.params
        own = {"image_exact_dedup": "same image file", "caption_exact_dedup": "same caption",
               "image_near_dedup": f"phash{getattr(p, 'hash_size', '')} within {getattr(p, 'hamming', '')} bits",
               "caption_near_dedup": f"caption Jaccard >= {getattr(p, 'jaccard', '')}"}[self.name]
        if not self.pair:
            return f"{p.match} only: {own}"
        other = (f"caption Jaccard >= {p.caption_jaccard}" if self.primary == "image"
                 else f"phash{p.image_hash_size} within {p.image_hamming} bits")
        if self.name == "image_exact_dedup":
            other = "same caption"
        return f"pair: {own} and {other}"

    def keeps_captions(self) -> bool:
        return (self.pair and self.primary == "image") or isinstance(self, CaptionNearDedup)

    def index_bytes(self) -> int:
        parts = [self.ids, self.captions, self.image_keys, self.caption_keys, self.index]
        parts += [self.other_phash] if self.other_phash is not None else []
        return int(sum(p.nbytes for p in parts)) + getattr(self, "extra_bytes", lambda: 0)()

    def _other_phash(self, sample) -> np.ndarray:
        return phash_words(sample["stats"][phash_key(self.params.image_hash_size)], self.params.image_hash_size)

    def similarities(self, sample, rows: np.ndarray) -> np.ndarray:
        """Caption Jaccard similarity of the sample to each kept row, computed once per distinct caption
        (formulaic ad captions repeat: a caption may have thousands of kept rows)."""
        _, first, inverse = np.unique(self.caption_keys[rows], return_index=True, return_inverse=True)
        caption = sample["caption"].strip()
        sims = np.array([jaccard(caption, self.captions[int(rows[i])], self.params.ngram) for i in first])
        return sims[inverse.reshape(-1)]

    def pairs(self, sample, rows: np.ndarray) -> np.ndarray:
        """Those of `rows` (sorted) that are duplicates of the sample on the side the op's own index
        does not compare: in pair mode, the caption (image ops) or the image (caption ops); in the
        one-sided image mode, not the sample's own image row (another reference of it)."""
        if not len(rows):
            return rows
        if not self.pair:
            return rows[self.image_keys[rows] != _image_key(sample)] if self.primary == "image" else rows
        if self.primary == "image":
            return rows[self.similarities(sample, rows) >= self.params.caption_jaccard]
        distance = popcount64(self.other_phash[rows] ^ self._other_phash(sample)).sum(axis=1)
        return rows[distance <= self.params.image_hamming]

    def first(self, sample, rows: np.ndarray) -> int | None:
        rows = self.pairs(sample, rows)
        return int(rows[0]) if len(rows) else None

    def score(self, sample):
        return sample["stats"].get(self.stat) if self.stat else None


# ------------------------------------------------------------------------------------------- images
@dataclass
class ImageExactParams(PairParams):
    modes = ("pair", "image")


@register
class ImageExactDedup(Deduplicator):
    """Identical decoded pixels; in pair mode also an identical caption (whitespace ignored). A
    re-encoded copy of a JPEG is not identical — that is the near-duplicate op's job."""

    name = "image_exact_dedup"
    Params = ImageExactParams
    reason = "duplicate_image"
    primary = "image"

    def start(self):
        self.index = BandIndex(1)

    def _key(self, sample) -> tuple[int]:
        stats = sample["stats"]
        return (hash64((stats["image_sha1"] + ("\0" + stats["caption_sha1"] if self.pair else "")).encode()),)

    def find(self, sample):
        return self.first(sample, self.index.candidates(self._key(sample)))

    def remember(self, sample, row):
        self.index.add(self._key(sample), row)


@dataclass
class NearImageParams(PairParams):
    hamming: int = 4  # at most this many of the hash's bits may differ
    hash_size: int = 16  # phash side: hash_size**2 bits

    modes = ("pair", "image")

    def validate(self, where):
        super().validate(where)
        if not 0 <= self.hamming < self.hash_size ** 2 or self.hash_size < 4:
            raise UserError(f"{where}: need hash_size >= 4 and 0 <= hamming < hash_size**2")


@register
class ImageNearDedup(Deduplicator):
    """Perceptual hash (imagehash.phash: the DCT's low frequencies) within `hamming` bits; in pair
    mode also captions with word n-gram Jaccard >= `caption_jaccard`.

    Lookup: the hash is cut into hamming + 1 bands; two hashes within `hamming` bits agree
    exactly on at least one band (pigeonhole), so only rows sharing a band are compared.
    """

    name = "image_near_dedup"
    Params = NearImageParams
    reason = "near_duplicate_image"
    stat = "phash_distance"
    primary = "image"

    def start(self):
        bits = self.params.hash_size ** 2
        n_bands = self.params.hamming + 1
        self.band_edges = [int(x) for x in np.linspace(0, bits, n_bands + 1)]
        self.index = BandIndex(n_bands)
        self.hashes = Column(np.uint64, -(-bits // 64))
        self.extra_bytes = lambda: self.hashes.nbytes

    def _bands(self, value: int) -> list[int]:
        bits = self.params.hash_size ** 2
        return [hash64(b.to_bytes(2, "little") + ((value >> (bits - hi)) & ((1 << (hi - lo)) - 1)).to_bytes(32, "little"))
                for b, (lo, hi) in enumerate(zip(self.band_edges, self.band_edges[1:]))]

    def find(self, sample):
        text = sample["stats"][phash_key(self.params.hash_size)]
        rows = np.fromiter(self.index.candidates(self._bands(int(text, 16))), dtype=np.int64)
        if not len(rows):
            return None
        distance = popcount64(self.hashes[rows] ^ phash_words(text, self.params.hash_size)).sum(axis=1)
        close = distance <= self.params.hamming
        rows, distance = rows[close], distance[close]
        paired = np.isin(rows, self.pairs(sample, rows))
        if not paired.any():
            return None
        rows, distance = rows[paired], distance[paired]
        best = int(np.lexsort((rows, distance))[0])  # nearest first, then the earliest row
        sample["stats"]["phash_distance"] = int(distance[best])
        return int(rows[best])

    def remember(self, sample, row):
        text = sample["stats"][phash_key(self.params.hash_size)]
        self.index.add(self._bands(int(text, 16)), row)
        self.hashes.append(phash_words(text, self.params.hash_size))


# ----------------------------------------------------------------------------------------- captions
@dataclass
class CaptionExactParams(PairParams):
    modes = ("pair", "caption")


@register
class CaptionExactDedup(Deduplicator):
    """The same caption text (surrounding whitespace ignored); in pair mode also a near-identical
    image (phash within `image_hamming` bits)."""

    name = "caption_exact_dedup"
    Params = CaptionExactParams
    reason = "duplicate_caption"
    primary = "caption"

    def start(self):
        self.index = BandIndex(1)

    def find(self, sample):
        return self.first(sample, self.index.candidates((hash64(caption_sha1(sample).encode()),)))

    def remember(self, sample, row):
        self.index.add((hash64(caption_sha1(sample).encode()),), row)


@dataclass
class NearCaptionParams(PairParams):
    jaccard: float = 0.8  # Jaccard similarity of the word n-gram sets at or above which rows are near-duplicates
    num_perm: int = 128

    modes = ("pair", "caption")

    def validate(self, where):
        super().validate(where)
        if not 0 < self.jaccard <= 1 or self.num_perm < 16:
            raise UserError(f"{where}: need 0 < jaccard <= 1, ngram >= 1, num_perm >= 16")


@register
class CaptionNearDedup(Deduplicator):
    """MinHash LSH over jieba word n-grams finds candidates (bands and rows chosen as datasketch's
    MinHashLSH chooses them for the threshold); a candidate is a duplicate when the exact Jaccard
    similarity of the two n-gram sets is >= `jaccard` (and, in pair mode, the images are near-identical)."""

    name = "caption_near_dedup"
    Params = NearCaptionParams
    reason = "near_duplicate_caption"
    stat = "caption_jaccard"
    primary = "caption"
    transient = ("minhash_bands",)

    def _layout(self) -> tuple[int, int]:
        """(bands, rows per band), as MinHashLSH picks them (an integration: ~0.1 s, so computed once)."""
        if not hasattr(self, "_bands_rows"):
            from datasketch.lsh import _optimal_param

            self._bands_rows = _optimal_param(self.params.jaccard, self.params.num_perm, 0.5, 0.5)
        return self._bands_rows

    def compute_stats(self, sample):
        from datasketch import MinHash

        super().compute_stats(sample)
        grams = word_grams(sample["caption"].strip(), self.params.ngram)
        if not hasattr(self, "_permutations"):  # (drawn once: MinHash() draws them anew each time, ~0.1 ms)
            self._permutations = MinHash(num_perm=self.params.num_perm, seed=1, scheme=MINHASH_SCHEME).permutations
        m = MinHash(num_perm=self.params.num_perm, seed=1, permutations=self._permutations, scheme=MINHASH_SCHEME)
        m.update_batch([g.encode("utf-8") for g in grams])
        values = m.hashvalues.astype(np.uint32)
        bands, rows = self._layout()
        sample["stats"]["minhash_bands"] = [
            format(hash64(values[b * rows:(b + 1) * rows].tobytes()), "x") for b in range(bands)]

    def start(self):
        self.index = BandIndex(self._layout()[0])

    def find(self, sample):
        rows = self.index.candidates([int(k, 16) for k in sample["stats"]["minhash_bands"]])
        # The image side first (pair mode): one vectorised phash distance over every candidate leaves
        # few rows or none, and the exact Jaccard (a Python call per distinct caption) runs on those
        # alone. Formulaic captions give a row thousands of candidates at 200k rows: computed the other
        # way round this op's decision cost grew with the row count (0.41 -> 0.72 ms a row, 50k -> 200k).
        rows = self.pairs(sample, rows)
        if not len(rows):
            return None
        sims = self.similarities(sample, rows)
        close = sims >= self.params.jaccard
        if not close.any():
            return None
        rows, sims = rows[close], sims[close]
        best = int(np.lexsort((rows, -sims))[0])  # most similar first, then the earliest row
        sample["stats"]["caption_jaccard"] = round(float(sims[best]), 4)
        return int(rows[best])

    def remember(self, sample, row):
        self.index.add([int(k, 16) for k in sample["stats"]["minhash_bands"]], row)
