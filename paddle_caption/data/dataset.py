"""Caption dataset, batch collator and a resumable length-grouped batch sampler.

Division of work: captions are tokenised once when the dataset is built (fast, and it gives the
sampler every sample's length); images are read and decoded in `__getitem__`, i.e. in the
DataLoader workers, so the main process only trains. Everything handed to the DataLoader is numpy
(paddle tensors inside workers crash them); the DataLoader turns the batch into tensors itself.

Data order is a pure function of (seed, epoch): a resumed run rebuilds the same batches and skips
the ones it already trained on.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .images import ImageRejected, decode_image, preprocess_image
from ..model.config import IGNORE_INDEX
from .prompts import PromptTemplate
from .records import TRAINING_KEYS, missing_keys, read_image_bytes
from .samples import assemble_sample, build_prompt_ids, sample_length


class CaptionDataset:
    """Map-style dataset over converted records (see `paddle_caption.data.records`).

    `records` is a sequence of dicts `{"id", "caption", "tsv", "offset", "length", ...}` (the lines
    of records.jsonl). Items are dicts of numpy arrays: `input_ids` int64 [T], `labels` int64 [T],
    `image` float32 [3, S, S], and `id` (str). `lengths[i]` is item i's T.

    A plain class rather than a `paddle.io.Dataset` subclass: paddle's DataLoader only needs
    `__len__`/`__getitem__`, and this keeps the module importable without paddle.
    """

    def __init__(self, records: Sequence[dict], tokenizer, template: PromptTemplate,
                 image_size: int, max_length: int, augment=None):
        self.records = list(records)
        for index, record in enumerate(self.records):
            missing = missing_keys(record, TRAINING_KEYS)
            if missing:
                raise ValueError(f"record #{index} (id={record.get('id', '?')}): missing keys {missing}")
        self.image_size = int(image_size)
        self.max_length = int(max_length)
        self.pad_id = tokenizer.pad_id
        self.im_end_id = tokenizer.im_end_id
        self.prompt_ids = np.asarray(build_prompt_ids(tokenizer, template), dtype=np.int64)
        if len(self.prompt_ids) + 1 > self.max_length:
            raise ValueError(
                f"max_length {self.max_length} is too small: the prompt context is "
                f"{len(self.prompt_ids)} tokens and needs at least one answer token after it"
            )
        # All answers in one flat int32 array (+ offsets): far smaller than a list of lists.
        answers = [tokenizer.encode(str(r["caption"])) for r in self.records]
        self._answer_offsets = np.zeros(len(answers) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in answers], out=self._answer_offsets[1:])
        self._answers = np.fromiter((t for a in answers for t in a), dtype=np.int32,
                                    count=int(self._answer_offsets[-1]))
        prompt_len = len(self.prompt_ids)
        self.lengths = np.array(
            [sample_length(prompt_len, len(a), self.max_length) for a in answers], dtype=np.int64
        )
        # Caption-aware augmentation (augment.py, an AugmentConfig; None or all-zero: off). Flipped
        # captions are tokenised here once, like the others.
        self.augmenter, self.epoch, self._flipped_answers = None, 0, {}
        if augment is not None and augment.enabled:
            from .augment import CaptionAugmenter

            self.augmenter = CaptionAugmenter(augment, [str(r["caption"]) for r in self.records])
            self._flipped_answers = {i: np.asarray(tokenizer.encode(c), dtype=np.int64)
                                     for i, c in enumerate(self.augmenter.flipped) if c is not None}

    def set_epoch(self, epoch: int) -> None:
        """The epoch augmentation draws for (each sample's draws: a function of seed, epoch, index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def answer_ids(self, index: int) -> np.ndarray:
        start, stop = self._answer_offsets[index], self._answer_offsets[index + 1]
        return self._answers[start:stop].astype(np.int64)

    def load_image(self, index: int) -> np.ndarray:
        return preprocess_image(self._decode(index), self.image_size)

    def _decode(self, index: int):
        record = self.records[index]
        try:
            # The converter already verified every image, so skip PIL's second full decode.
            img = decode_image(read_image_bytes(record), verify=False)
        except (ImageRejected, OSError, ValueError) as err:
            raise ValueError(
                f"record {record['id']} ({record['tsv']} @ byte {record['offset']}): cannot load image: {err}"
            ) from err
        return img

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        answer = self.answer_ids(index)
        if self.augmenter is None:
            image = self.load_image(index)
        else:
            img, flipped = self.augmenter(self._decode(index), index, self.epoch)
            image = preprocess_image(img, self.image_size)
            answer = self._flipped_answers[index] if flipped else answer
        sample = assemble_sample(self.prompt_ids, answer, self.im_end_id,
                                 self.max_length, sample_id=record["id"])
        sample["image"] = image
        sample["id"] = str(record["id"])
        return sample


class Collator:
    """Pad a list of dataset items into one batch of numpy arrays (right padding, to the longest).

    A class rather than a closure so that DataLoader workers can pickle it.
    """

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, samples: Sequence[dict]) -> dict:
        return collate_batch(samples, self.pad_id)


def collate_batch(samples: Sequence[dict], pad_id: int) -> dict:
    """-> `input_ids` int64 [B,T] (pad = pad_id), `attention_mask` int64 [B,T] (1 real, 0 pad),
    `labels` int64 [B,T] (-100 on pads), `images` float32 [B,3,S,S], `ids` list[str]."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(s["input_ids"]) for s in samples)
    batch = len(samples)
    input_ids = np.full((batch, longest), pad_id, dtype=np.int64)
    labels = np.full((batch, longest), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((batch, longest), dtype=np.int64)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
        attention_mask[row, :n] = 1
    images = np.stack([s["image"] for s in samples]).astype(np.float32, copy=False)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "images": images, "ids": [str(s["id"]) for s in samples]}


class LengthGroupedBatchSampler:
    """Batches of indices, fully determined by (seed, epoch); optionally grouped by length.

    Grouping (as HF's `LengthGroupedSampler`): shuffle, cut into mega-batches of
    `batch_size * mega_batch_mult`, sort each by length (longest first) and cut it into batches,
    then shuffle the batch order. Similar lengths share a batch, so less compute goes to padding.

    Resume: `set_epoch(epoch, skip_batches=k)` makes the next iteration yield that epoch's batches
    from the k-th on; `len()` counts the batches that iteration will yield, `batches_per_epoch`
    the full epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 group_by_length: bool = True, drop_last: bool = False, mega_batch_mult: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.group_by_length = bool(group_by_length)
        self.drop_last = bool(drop_last)
        self.mega_batch_mult = int(mega_batch_mult)
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = int(epoch)
        self.skip_batches = int(skip_batches)
        if not 0 <= self.skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches {skip_batches} outside 0..{self.batches_per_epoch}")

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of `epoch`, in order."""
        n, bs = len(self.lengths), self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            mega = bs * max(1, self.mega_batch_mult)
            chunks = [order[i:i + mega] for i in range(0, n, mega)]
            order = np.concatenate(
                [c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks]
            ) if chunks else order
        # Mega-batches are multiples of bs, so only the very last batch can be short.
        batches = [order[i:i + bs].tolist() for i in range(0, n, bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        if self.shuffle and self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self):
        yield from self.epoch_batches(self.epoch)[self.skip_batches:]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches


class RankBatchSampler:
    """One rank's share of a LengthGroupedBatchSampler's epoch for data parallel: batches[rank::world].

    Every rank computes the same epoch order (a function of seed and epoch) and takes every
    world-th batch. An optimiser step consumes `world * accumulation` consecutive batches of that
    order (micro-step m of rank r takes batch m * world + r of the step's group), so the epoch is cut
    to whole steps: the tail that would leave ranks with unequal counts, or a step without all its
    micro-batches, is dropped. Hence one process with accumulation A * W trains on exactly the
    batches, in exactly the groups, that W ranks with accumulation A do. With world 1 and
    accumulation 1 it is the whole epoch. Resumable like its base.
    """

    def __init__(self, base: LengthGroupedBatchSampler, rank: int = 0, world: int = 1,
                 accumulation: int = 1):
        self.base, self.rank, self.world = base, int(rank), int(world)
        self.accumulation = int(accumulation)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip_batches)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        batches = self.base.epoch_batches(epoch)
        per_step = self.world * self.accumulation
        usable = len(batches) - len(batches) % per_step
        return batches[:usable][self.rank::self.world]

    @property
    def batches_per_epoch(self) -> int:
        per_step = self.world * self.accumulation
        return self.base.batches_per_epoch // per_step * self.accumulation

    def __iter__(self):
        yield from self.epoch_batches(self.epoch)[self.skip:]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip)


def make_dataloader(dataset: CaptionDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                    num_workers: int = 0, group_by_length: bool = True, drop_last: bool = False,
                    rank: int = 0, world: int = 1, accumulation: int = 1, pad_id: int | None = None,
                    prefetch_factor: int = 2):
    """A paddle DataLoader over `dataset` whose `.batch_sampler` is this rank's `RankBatchSampler`.

    Call `loader.batch_sampler.set_epoch(e, skip_batches=k)` before iterating each epoch. Batches
    arrive as dicts of paddle tensors (plus the `ids` list); worker processes decode the images.
    """
    import paddle

    base = LengthGroupedBatchSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed,
                                     group_by_length=group_by_length, drop_last=drop_last)
    return paddle.io.DataLoader(
        dataset,
        batch_sampler=RankBatchSampler(base, rank, world, accumulation),
        collate_fn=Collator(dataset.pad_id if pad_id is None else pad_id),
        num_workers=num_workers,
        prefetch_factor=prefetch_factor,
        # Augmenting datasets draw per epoch (`set_epoch`): workers restart each epoch to see it.
        persistent_workers=num_workers > 0 and getattr(dataset, "augmenter", None) is None,
        # Workers hand back numpy batches, and the tensors are made here. With shared memory, each
        # forked worker builds Paddle tensors itself, and Paddle's memory-statistics lock (a
        # pthread rwlock) can be copied in its locked state when the fork lands while another
        # thread of this process holds it: the worker then blocks forever on its first free
        # (seen as a hung test suite; the worker's feeder thread held the GIL, waiting on it).
        use_shared_memory=False,
        return_list=True,
    )
