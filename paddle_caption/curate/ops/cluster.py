"""Cluster-based selection: k-means on the vision tower's pooled features, a per-cluster quota.

As one Better Synth solution did: cluster the images, give each cluster a quota proportional to its
size (largest remainders, so the quotas sum to `target`), and fill it with the rows nearest the
centre, the farthest ones and a random sample of the middle, in the shares `near`, `far` and the
rest. Rows outside their cluster's quota are dropped with reason `cluster_quota`.

Statistics: `vision_features` (the pooled features, base64 float32; transient: not carried past this
op), then `cluster` and `cluster_distance`. k-means is scikit-learn's MiniBatchKMeans fitted
incrementally over batches of the stats file (`partial_fit`), so features are never all in memory;
the selection holds a cluster label and a distance per row (9 bytes), never the features.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from itertools import islice

import numpy as np

from ...runtime import UserError
from ..samples import load_image
from .base import Op, register

FIT_BATCH = 1024


@dataclass
class ClusterParams:
    model_dir: str = ""
    n_clusters: int = 8
    target: int = 0  # rows to keep; 0: use target_fraction
    target_fraction: float = 0.0
    near: float = 1 / 3
    far: float = 1 / 3
    epochs: int = 3  # partial_fit passes over the features
    seed: int = 0

    def validate(self, where):
        if self.n_clusters < 1 or (self.target > 0) == (self.target_fraction > 0):
            raise UserError(f"{where}: need n_clusters >= 1 and exactly one of target (> 0) or target_fraction (> 0)")
        if self.near < 0 or self.far < 0 or self.near + self.far > 1 or self.epochs < 1:
            raise UserError(f"{where}: need near, far >= 0, near + far <= 1, epochs >= 1")


def _features(sample) -> np.ndarray:
    return np.frombuffer(base64.b64decode(sample["stats"]["vision_features"]), dtype=np.float32)


def proportional_quotas(sizes: list[int], target: int) -> list[int]:
    """Quotas proportional to `sizes` summing to min(target, total) (largest remainders)."""
    total = sum(sizes)
    target = min(target, total)
    exact = [target * s / total for s in sizes] if total else [0.0] * len(sizes)
    quotas = [int(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: -(exact[i] - quotas[i]))
    for i in order[: target - sum(quotas)]:
        quotas[i] += 1
    return [min(q, s) for q, s in zip(quotas, sizes)]


@register
class ClusterSelect(Op):
    """k-means on pooled vision features; per-cluster quotas of near, far and random middle rows."""

    name = "cluster_select"
    Params = ClusterParams
    uses_model = True
    stat = "cluster_distance"
    transient = ("vision_features",)

    def compute_stats_batch(self, samples):
        from ..scoring import pooled_features

        predictor = self.ctx.models.get(self.params.model_dir)
        feats = pooled_features(predictor, [predictor.preprocess(load_image(s)) for s in samples])
        for sample, f in zip(samples, feats):
            sample["stats"]["vision_features"] = base64.b64encode(f.astype(np.float32).tobytes()).decode("ascii")

    def _chunks(self, read):
        it = iter(read())
        while True:
            chunk = list(islice(it, FIT_BATCH))
            if not chunk:
                return
            yield chunk

    def prepare(self, read):
        from sklearn.cluster import MiniBatchKMeans

        p = self.params
        n = sum(1 for _ in read())
        k = min(p.n_clusters, n)
        self.kmeans = MiniBatchKMeans(n_clusters=k, random_state=p.seed, batch_size=FIT_BATCH, n_init=3)
        for _ in range(p.epochs):
            for chunk in self._chunks(read):
                x = np.stack([_features(s) for s in chunk])
                if len(x) >= k:  # partial_fit needs at least k rows in a batch
                    self.kmeans.partial_fit(x)
        if not hasattr(self.kmeans, "cluster_centers_"):
            self.kmeans.partial_fit(np.stack([_features(s) for s in read()]))
        labels, distances = [], []
        for chunk in self._chunks(read):
            x = np.stack([_features(s) for s in chunk])
            labels.append(self.kmeans.predict(x).astype(np.int32))
            distances.append(np.linalg.norm(x - self.kmeans.cluster_centers_[labels[-1]], axis=1).astype(np.float32))
        self.labels = np.concatenate(labels)
        distances = np.concatenate(distances)
        sizes = np.bincount(self.labels, minlength=k).tolist()
        target = p.target if p.target > 0 else round(p.target_fraction * n)
        quotas = proportional_quotas(sizes, target)
        self.keep = np.zeros(n, dtype=bool)
        rng = np.random.default_rng(p.seed)
        for c, quota in enumerate(quotas):
            members = np.flatnonzero(self.labels == c)
            order = members[np.argsort(distances[members], kind="stable")]
            n_near = round(quota * p.near)
            n_far = min(round(quota * p.far), quota - n_near)
            n_mid = quota - n_near - n_far
            self.keep[order[:n_near]] = True
            if n_far:
                self.keep[order[len(order) - n_far:]] = True
            middle = order[n_near:len(order) - n_far]
            self.keep[rng.choice(middle, size=min(n_mid, len(middle)), replace=False)] = True
        self.distances = distances
        self.info = {"clusters": k, "sizes": sizes, "quotas": quotas, "target": target, "kept": int(self.keep.sum())}

    def select(self, read):
        self.prepare(read)
        for i, sample in enumerate(read()):
            sample["stats"]["cluster"] = int(self.labels[i])
            sample["stats"]["cluster_distance"] = round(float(self.distances[i]), 6)
            yield sample, None if self.keep[i] else "cluster_quota"
