"""`InferenceEngine`: an exported directory run by Paddle Inference, called like the eager model.

The decoding package drives a model through two calls (decoding/batch.py: `DecodeBatch`):

    model(ids, images=..., attention_mask=..., use_cache=True, last_logits_only=True)   # prefill
    model(ids, attention_mask=..., past_key_values=..., use_cache=True[, logits_index=...])  # decode

(`skip_head=True` with either: no logits, only the hidden rows, for `greedy_head.GreedyHead`)

and reads `model.config`, `model.training`, `model.eval()`, `model.dtype` and `model.lm_head`
(`decoding.generate` keeps a transposed copy of an eager head; the engine has its own: None). The
engine answers those calls with its three Paddle Inference predictors (vision -> prefill, decode)
and the output layer in numpy (`OutputHead`: why in graphs.py), applied only to the rows asked for
(the last position, or `logits_index`), as the eager model does. So batching, continuous batching
(the caption service) and speculative decoding (`step_many`, `rollback`) run unchanged on top of
it. Outputs are Paddle tensors over the predictors' output arrays (no copy), as `DecodeBatch` pads,
gathers and concatenates the cache with Paddle ops.

Limits, refused in one line: a cache wider than the model's seq_length (the graphs fix dynamic NTK
and log-n scaling to their values below it, graphs.py), and training-only arguments (labels,
position ids, full-sequence prefill logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime import UserError, requested_threads
from .cpu_features import require_precision_support
from .export import read_manifest
from .predictors import PRECISIONS, GraphRunner


@dataclass
class EngineOutput:
    logits: object  # paddle.Tensor: [B, 1, V] (prefill), [B, T, V] or [len(logits_index), V] (decode); None with skip_head
    past_key_values: list  # per layer (k, v), each paddle.Tensor [B, H, width, D]
    loss: None = None
    hidden: object = None  # numpy [rows, C]: the final hidden states behind selected logits (draft heads)


class OutputHead:
    """logits = hidden @ W for W [hidden, vocab] (lm_head.npy): few rows (2-32, batched decoding
    and verification) through a transposed copy of W in vocabulary blocks, as the eager model's
    numpy head does (decoding/output_head.py), other row counts as one product. Holds W twice
    (39 MB each for the real vocabulary at width 64), as a predicting eager model does. Greedy
    rows skip the full product through `greedy()` (decoding/greedy_head.py)."""

    def __init__(self, path: Path, hidden: int, vocab: int):
        if not path.is_file():
            raise UserError(f"exported output layer missing: {path}")
        self.weight = np.load(path)
        if self.weight.shape != (hidden, vocab) or self.weight.dtype != np.float32:
            raise UserError(f"{path}: expected float32 [{hidden}, {vocab}], got {self.weight.dtype} "
                            f"{list(self.weight.shape)}")
        self.weight_t = np.ascontiguousarray(self.weight.T)
        self._greedy = None

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        from ..decoding.output_head import head_product

        return head_product(rows, self.weight, self.weight_t)

    def greedy(self):
        """The head's `GreedyHead` (decoding/greedy_head.py): greedy tokens without full logits."""
        if self._greedy is None:
            from ..decoding.greedy_head import GreedyHead

            self._greedy = GreedyHead(self.weight, self.weight_t)
        return self._greedy


def mask_bias(mask: np.ndarray, queries: int) -> np.ndarray:
    """The additive attention mask [B, 1, queries, total] the graphs take for a 1/0 `mask` [B, total]
    whose last `queries` positions ask: 0 where the key is a real token at or before the query, else
    finfo(float32).min — the values `qwen.attention_bias` gives the eager model. Built here in numpy
    because Paddle's broadcasting compare / logical_and / where inside the graph cost ~60 of 122 ms
    of a batch-16 prefill (graphs.py); here it is one broadcast minimum over the cached causal mask."""
    from ..model.attention import MASK_VALUE, causal_bias_np

    keys = np.where(mask.astype(bool), np.float32(0), np.float32(MASK_VALUE))[:, None, None, :]
    return np.minimum(causal_bias_np(queries, mask.shape[1]), keys)


class SequenceTooLong(UserError):
    """A forward whose cache would outgrow what the exported graphs compute exactly."""


def _array(value, dtype) -> np.ndarray:
    """A Paddle tensor or array as a contiguous numpy array (a view of a CPU tensor when possible)."""
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value, dtype=dtype)
    from ..model.numpy_bridge import as_numpy

    return np.ascontiguousarray(as_numpy(value), dtype=dtype)


def _tensor(array: np.ndarray):
    from ..model.numpy_bridge import from_numpy

    return from_numpy(array)


class InferenceEngine:
    # Images per vision-graph call: bounds the activations of a large prefill (the ViT's are
    # [N, grid^2, width] per layer) while keeping oneDNN's batched products.
    VISION_BATCH = 16

    def __init__(self, export_dir, threads: int | None = None, precision: str | None = None):
        from ..model.config import MgenVLConfig

        self.directory = Path(export_dir)
        self.manifest = read_manifest(self.directory)
        self.precision = precision or self.manifest["precision"]
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        require_precision_support(self.precision)
        self.config = MgenVLConfig.from_pretrained(self.directory)
        self.max_total_tokens = int(self.manifest["max_total_tokens"])
        threads = threads or requested_threads()
        graphs = self.manifest["graphs"]
        self.vision, self.prefill, self.decode = (
            GraphRunner(self.directory / Path(graphs[name]["program"]).stem, self.precision, threads)
            for name in ("vision", "prefill", "decode"))
        self.head = OutputHead(self.directory / self.manifest["lm_head"]["file"], self.config.hidden_size,
                               self.config.vocab_size)
        self.training = False
        self.lm_head = None  # the head lives inside the graphs

    # ---- what decoding reads besides the calls ----------------------------------------------------
    @property
    def dtype(self) -> str:
        """The dtype images and caches cross in (the precision is inside the predictors)."""
        return "float32"

    def eval(self) -> "InferenceEngine":
        return self

    def train(self, mode: bool = True) -> "InferenceEngine":
        if mode:
            raise UserError("an exported model only predicts: train the eager model (model directory)")
        return self

    # ---- the forward --------------------------------------------------------------------------------
    def encode_images(self, images) -> np.ndarray:
        """images [N, 3, S, S] -> features [N, n_queries, hidden] (in chunks of `VISION_BATCH`)."""
        pixels = _array(images, np.float32)
        size = self.config.visual.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"images must be [N, 3, {size}, {size}], got {list(pixels.shape)}")
        parts = [self.vision(pixels[i:i + self.VISION_BATCH])[0] for i in range(0, len(pixels), self.VISION_BATCH)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def __call__(self, input_ids, images=None, attention_mask=None, labels=None, position_ids=None,
                 past_key_values=None, use_cache=True, last_logits_only=False, logits_index=None,
                 image_features=None, skip_head=False, **unused) -> EngineOutput:
        if labels is not None or position_ids is not None or unused:
            raise ValueError("the inference engine takes ids, images, attention_mask, past_key_values, "
                             "last_logits_only and logits_index only (no labels, position ids or training options)")
        ids = _array(input_ids, np.int64)
        batch, length = ids.shape
        past_len = 0 if past_key_values is None else int(past_key_values[0][0].shape[2])
        mask = np.ones((batch, past_len + length), np.int64) if attention_mask is None \
            else _array(attention_mask, np.int64)
        if mask.shape != (batch, past_len + length):
            raise ValueError(f"attention_mask must be [{batch}, {past_len + length}], got {list(mask.shape)}")
        if mask.shape[1] > self.max_total_tokens:
            raise SequenceTooLong(
                f"{mask.shape[1]} tokens exceed the exported model's limit of {self.max_total_tokens} "
                f"(seq_length): the graphs compute Qwen's dynamic NTK / log-n scaling only up to it")
        if past_key_values is None:
            if not last_logits_only:
                raise ValueError("the exported prefill returns the last position's logits only: "
                                 "pass last_logits_only=True")
            return self._prefill(ids, mask, images, image_features, skip_head)
        if images is not None or image_features is not None:
            raise ValueError("images enter in the prefill only (past_key_values given)")
        return self._decode(ids, mask, past_key_values, last_logits_only, logits_index, skip_head)

    def _prefill(self, ids, mask, images, image_features, skip_head=False) -> EngineOutput:
        from ..model.mgen_vl import image_span_rows

        cfg = self.config
        rows = image_span_rows(cfg, ids)
        n_spans = len(rows) // cfg.visual.n_queries
        given = images if image_features is None else image_features
        n_images = 0 if given is None else int(given.shape[0])
        if n_spans != n_images:
            raise ValueError(f"{n_spans} image span(s) in input_ids but {n_images} image(s) given: refusing a "
                             "silent text-only pass (pass one image per <img> span, in order)")
        if n_spans == 0:  # one zero span into the graph's scratch row (graphs.PrefillGraph)
            rows = np.full(cfg.visual.n_queries, ids.size, np.int64)
            features = np.zeros((1, cfg.visual.n_queries, cfg.hidden_size), np.float32)
        elif image_features is not None:
            features = _array(image_features, np.float32)
        else:
            features = self.encode_images(images)
        outputs = self.prefill(ids, mask, mask_bias(mask, ids.shape[1]), rows.astype(np.int64), features)
        last = outputs[0][:, -1]  # [B, C]
        logits = None if skip_head else _tensor(self.head(last)[:, None])
        return EngineOutput(logits, self._pairs(outputs[1:]), hidden=last)

    def _decode(self, ids, mask, past, last_logits_only, logits_index, skip_head=False) -> EngineOutput:
        flat_past = [_array(t, np.float32) for layer in past for t in layer]
        outputs = self.decode(ids, mask, mask_bias(mask, ids.shape[1]), *flat_past)
        hidden = outputs[0]  # [B, T, C]
        if logits_index is not None:  # only the rows asked for go through the head
            rows = hidden.reshape(-1, hidden.shape[-1])[np.asarray(logits_index, dtype=np.int64)]
            if skip_head:
                return EngineOutput(None, self._pairs(outputs[1:]), hidden=rows)
            logits = self.head(np.ascontiguousarray(rows))
        elif last_logits_only:
            rows = hidden[:, -1]
            if skip_head:
                return EngineOutput(None, self._pairs(outputs[1:]), hidden=rows)
            logits = self.head(np.ascontiguousarray(rows))[:, None]
        else:
            batch, length, width = hidden.shape
            logits = self.head(hidden.reshape(-1, width)).reshape(batch, length, -1)
            rows = None
        return EngineOutput(_tensor(logits), self._pairs(outputs[1:]), hidden=rows)

    @staticmethod
    def _pairs(flat: list) -> list:
        return [(_tensor(flat[i]), _tensor(flat[i + 1])) for i in range(0, len(flat), 2)]
