"""The model side of curation: batches of samples through the captioner the kit predicts with.

Every model operation loads its model directory through `predict.predictor.load_predictor`, the
path `predict_batch.py` takes (same prompt, tokenizer, preprocessing and generation), once per run
(`ModelCache`), and works in batches:

- `caption_logprobs`: per row, the mean log-probability of the caption's tokens (and the closing
  `<|im_end|>`) given an image, or with the image rows ablated (`config.ablate_images`: zeros where
  the visual features go) — the training forward's supervised-positions head, one
  [supervised tokens x vocab] product per batch;
- `image_features` / `pooled_features`: the vision tower's output (averaged over its queries);
- `candidates`: n captions per image (beams or samples) through `Predictor.generate_ids`.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np

from ..runtime import UserError


class ModelCache:
    """One Predictor per model directory for the whole run."""

    def __init__(self, num_threads: int | None = None, engine: str = ""):
        self.num_threads = num_threads
        self.engine = engine or None  # None: what the directory holds (predictor.resolve_engine)
        self._loaded: dict = {}

    def get(self, model_dir: str):
        if model_dir not in self._loaded:
            from ..predict.predictor import load_predictor
            from ..runtime import configure

            configure(self.num_threads)
            if not model_dir:
                raise UserError("a model operation needs model_dir (in the op or at the recipe's top level)")
            self._loaded[model_dir] = load_predictor(model_dir, engine=self.engine)
        return self._loaded[model_dir]


@contextlib.contextmanager
def images_ablated(model):
    """The model with its image rows zeroed (the no-image ablation), restored afterwards."""
    before = model.config.ablate_images
    model.config.ablate_images = True
    try:
        yield model
    finally:
        model.config.ablate_images = before


def _batch_tensors(predictor, images: list[np.ndarray], captions: list[str], max_length: int):
    import paddle

    from ..data.dataset import collate_batch
    from ..data.samples import assemble_sample

    tok = predictor.tokenizer
    items = []
    for image, caption in zip(images, captions):
        item = assemble_sample(predictor.prompt_ids, tok.encode(caption), tok.im_end_id, max_length)
        item["image"], item["id"] = image, ""
        items.append(item)
    batch = collate_batch(items, tok.pad_id)
    dtype = next(iter(predictor.model.parameters())).dtype
    return (paddle.to_tensor(batch["input_ids"]), paddle.to_tensor(batch["images"]).astype(dtype),
            paddle.to_tensor(batch["attention_mask"]), paddle.to_tensor(batch["labels"]))


def caption_logprobs(predictor, images: list[np.ndarray], captions: list[str], max_length: int = 2048,
                     *, ablated: bool = False, features: bool = False) -> np.ndarray:
    """Mean token log-prob of each caption given its image (`ablated`: given zeros in the image
    rows instead), float64 [B]. With `features`, `images` are `image_features` outputs [Q, H]:
    the vision tower is not run again for an image scored with many captions."""
    if not images:
        return np.zeros(0)
    model = predictor.model
    if not hasattr(model, "sequence_logprobs"):
        raise UserError("caption scores (consistency, pseudo_label) need the training forward, which an exported model "
                        "directory does not hold: give the op the checkpoint's model_dir (engine dygraph)")
    ids, pixels, mask, labels = _batch_tensors(predictor, images, captions, max_length)
    given = {"image_features": pixels} if features else {"images": pixels}
    with images_ablated(model) if ablated else contextlib.nullcontext():
        sums, counts = model.sequence_logprobs(ids, attention_mask=mask, labels=labels, **given)
    return sums / counts


def image_features(predictor, images: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """The vision tower's output per image, float32 [B, n_queries, hidden], `batch_size` images
    at a time."""
    import paddle

    model = predictor.model
    if hasattr(model, "encode_images"):  # an exported model: its vision graph on Paddle Inference
        return np.concatenate([model.encode_images(np.stack(images[s:s + batch_size])).astype(np.float32)
                               for s in range(0, len(images), batch_size)])
    dtype = next(iter(model.parameters())).dtype
    with paddle.no_grad():
        out = [model.visual(paddle.to_tensor(np.stack(images[s:s + batch_size])).astype(dtype))
               .astype("float32").numpy() for s in range(0, len(images), batch_size)]
    return np.concatenate(out)


def pooled_features(predictor, images: list[np.ndarray]) -> np.ndarray:
    """The vision tower's features averaged over its queries, float32 [B, hidden]."""
    return image_features(predictor, images, batch_size=max(1, len(images))).mean(axis=1)


def candidates(predictor, images: list[np.ndarray], n: int, strategy: str, *, max_new_tokens: int,
               temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
    """n captions per image: the n best beams (`strategy="beam"`) or n samples (`"sample"`)."""
    from ..decoding.config import GenerationConfig

    if strategy == "beam":
        gen = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=max(n, 2) if n > 1 else 1,
                               num_return_sequences=n)
    else:
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                               top_p=top_p, num_return_sequences=n, seed=seed)
    ids = predictor.generate_ids(images, config=replace(gen))
    texts = [predictor.decode(x) for x in ids]
    return [texts[i * n:(i + 1) * n] for i in range(len(images))]
