"""MgenVLForCausalLM: the vision tower, the QWen decoder and the LM head, joined by one scatter.

A sample reads `prefix | <img> 256x<imgpad> </img> | prompt | answer`. The ids are embedded, the
visual tower encodes each image once, and its 256 vectors overwrite the embedding rows between
`<img>` and `</img>` (`paddle.scatter`). A sample with an image span but no image is an error,
never a silent text-only pass: that was the contest baseline's bug.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle

from .config import IGNORE_INDEX, MgenVLConfig
from .draft_heads import has_draft_heads, load_draft_heads, save_draft_heads
from .head import cross_entropy, linear_cross_entropy, linear_target_logprobs, project
from .precision import check_compute_dtype, default_dtype, default_load_dtype, dtype_name
from .qwen import QWenModel
from .visual import VisionTower

nn = paddle.nn
HEADS_PREFIX = "draft_heads."  # registered (trainable) draft heads' parameter names
F = paddle.nn.functional


@dataclass
class CausalLMOutput:
    loss: "paddle.Tensor | None" = None
    # Without labels (or with loss_on="all"): [B, T, V]. With labels and the default
    # loss_on="supervised": only the supervised positions, [N_supervised, V].
    logits: "paddle.Tensor | None" = None
    past_key_values: list | None = None
    # Inference paths that project selected rows (`last_logits_only`, `logits_index`): the final
    # hidden states (after ln_f) those logits come from, [rows, C]. Draft heads read them.
    hidden: "paddle.Tensor | None" = None


class LanguageModel(nn.Layer):
    """Holds the decoder as `.llm`, so parameter names read `transformer.llm.*` as in PaddleMIX."""

    def __init__(self, cfg: MgenVLConfig):
        super().__init__()
        self.llm = QWenModel(cfg)


class MgenVLForCausalLM(nn.Layer):
    def __init__(self, config: MgenVLConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.visual)
        self.transformer = LanguageModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias_attr=False)
        self._init_weights()

    # ---- construction --------------------------------------------------------------------------
    def _init_weights(self):
        """QWen's init for the decoder and head: N(0, 0.02), residual projections scaled down by
        sqrt(2 * layers). The visual tower keeps its own (Qwen-VL style) initialisers."""
        std = self.config.initializer_range
        normal = nn.initializer.Normal(std=std)
        residual = nn.initializer.Normal(std=std / math.sqrt(2 * self.config.num_hidden_layers))
        for name, param in self.transformer.named_parameters():
            if name.endswith("c_proj.weight"):
                residual(param)
            elif name.endswith(".weight") and len(param.shape) == 2:
                normal(param)
            elif name.endswith("c_attn.bias"):
                nn.initializer.Constant(0.0)(param)
        normal(self.lm_head.weight)

    @classmethod
    def from_config(cls, config: MgenVLConfig, dtype="float32", lazy: bool = False):
        """Build in `dtype` ("float32" | "bfloat16" | "float16"; every parameter, see precision.py),
        never in float32 first. `lazy`: under `paddle.LazyGuard` nothing is allocated or initialised
        (the 7B config builds in a fraction of a second and a few MB) until a checkpoint fills it
        (`load_into_model`); such a model has exact names, shapes and parameter counts."""
        guard = paddle.LazyGuard() if lazy else contextlib.nullcontext()
        with default_dtype(dtype), guard:
            return cls(config)

    @classmethod
    def from_pretrained(cls, path, allow_pickle: bool = False, dtype: str | None = None):
        """Load a model directory shard by shard into a lazily built model of `dtype` (default: the
        dtype the checkpoint is stored in where this device can compute in it, else float32 — a
        bfloat16 checkpoint on a CPU loads as float32); a checkpoint stored in another dtype is cast
        one tensor at a time. Strict: every key present, none extra, every shape equal."""
        from .weights_io import checkpoint_dtype, load_into_model

        config = MgenVLConfig.from_pretrained(path)
        dtype = dtype_name(dtype) if dtype else default_load_dtype(checkpoint_dtype(path, allow_pickle))
        model = cls.from_config(config, dtype=dtype, lazy=True)
        load_into_model(model, path, allow_pickle=allow_pickle)
        if has_draft_heads(path):  # Medusa heads saved beside the model (model/draft_heads.py)
            model.attach_draft_heads(load_draft_heads(path))
        model.eval()
        return model

    def attach_draft_heads(self, heads, trainable: bool = False) -> None:
        """`self.draft_heads = heads` (None: remove). Trainable heads are a registered sublayer
        (the draft-heads fine-tune mode: their parameters train, checkpoint and all-reduce like any
        other); otherwise they stay outside the registry, so the base model's `state_dict()` is
        the checkpoint's and nothing else trains them by accident."""
        self.__dict__.pop("draft_heads", None)
        self._sub_layers.pop("draft_heads", None)
        if heads is not None and trainable:
            self.add_sublayer("draft_heads", heads)
        elif heads is not None:
            self.__dict__["draft_heads"] = heads

    def save_pretrained(self, directory, max_shard_bytes: int = 2 << 30):
        """config.json + safetensors weights in the model's own dtype, written shard by shard."""
        from .weights_io import save_model_state

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(HEADS_PREFIX)}
        save_model_state(state, directory, max_shard_bytes=max_shard_bytes)
        self.config.save_pretrained(directory)
        heads = getattr(self, "draft_heads", None)
        if heads is not None:
            save_draft_heads(heads, directory)

    def load_weights(self, state: dict, source: str = "checkpoint"):
        """Strict by-name load of an in-memory {name: tensor or array}: every key present, no extra
        key, every shape equal; values are cast to each parameter's dtype."""
        from .weights_io import assign_parameter, check_state

        own = self.state_dict()
        check_state(own, state, source)
        for key, target in own.items():
            value = state[key]
            if not isinstance(value, paddle.Tensor):
                value = paddle.to_tensor(np.asarray(value))
            assign_parameter(target, value)

    @property
    def dtype(self) -> str:
        return dtype_name(self.lm_head.weight.dtype)

    def enable_recompute(self, enabled: bool = True) -> "MgenVLForCausalLM":
        """Activation checkpointing per decoder layer and per ViT layer (Paddle's `recompute`):
        in training, a block whose input carries a gradient keeps only that input and reruns its
        forward during backward. Values and gradients are unchanged (tests/test_recompute.py)."""
        self.transformer.llm.recompute = bool(enabled)
        self.visual.vit.transformer.recompute = bool(enabled)
        return self

    # ---- the image-text interaction ------------------------------------------------------------
    def image_span_rows(self, input_ids_np: np.ndarray) -> np.ndarray:
        """Flat row indices ([n_images * n_queries]) of the placeholder rows (`image_span_rows`)."""
        return image_span_rows(self.config, input_ids_np)

    def embed(self, input_ids, images=None, image_features=None):
        """Token embeddings with every image's visual features written into its span.

        `image_features` [n_images, n_queries, hidden] are the vision tower's outputs computed
        earlier (`self.visual(images)`), for callers that pair one image with many texts."""
        llm = self.transformer.llm
        embeds = llm.embed_tokens(input_ids)
        rows = self.image_span_rows(input_ids.numpy())
        n_spans = len(rows) // self.config.visual.n_queries
        given = images if image_features is None else image_features
        n_images = 0 if given is None else given.shape[0]
        if n_spans != n_images:
            raise ValueError(
                f"{n_spans} image span(s) in input_ids but {n_images} image(s) given: refusing a "
                "silent text-only pass (pass one image per <img> span, in order)")
        if n_spans == 0:
            return embeds
        batch, length, hidden = embeds.shape
        if self.config.ablate_images:
            features = paddle.zeros([len(rows), hidden], dtype=embeds.dtype)
        elif image_features is not None:
            features = image_features.reshape([-1, hidden]).astype(embeds.dtype)
        else:
            features = self.visual(images).reshape([-1, hidden]).astype(embeds.dtype)
        flat = paddle.scatter(embeds.reshape([batch * length, hidden]),
                              paddle.to_tensor(rows, dtype="int64"), features, overwrite=True)
        return flat.reshape([batch, length, hidden])

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, input_ids, images=None, attention_mask=None, labels=None, position_ids=None,
                past_key_values=None, use_cache=False, loss_on: str = "supervised",
                last_logits_only: bool = False, logits_index=None, skip_head: bool = False):
        """Returns CausalLMOutput(loss, logits, past_key_values).

        With labels, the loss is the mean next-token cross-entropy over supervised positions
        (labels != -100). `loss_on="supervised"` (default) computes the last decoder layer and
        lm_head only at those positions: on a ~400-token sample with a ~15-token answer that skips
        ~95% of the largest matrix product. `loss_on="all"` computes full logits first (same loss;
        kept for tests and the benchmark). `last_logits_only` (generation) runs the last layer's
        queries, its MLP and lm_head on the last position only. `logits_index` (speculative
        decoding's verification) is an int array of flat positions (row * T + column) and returns
        logits [len(logits_index), V] for those positions only: lm_head skips the rest. With either,
        `skip_head` returns no logits, only those rows' final hidden states (`hidden`): greedy
        decoding on a CPU takes its tokens from them (decoding/greedy_head.py).
        """
        check_compute_dtype(self.lm_head.weight)
        embeds = self.embed(input_ids, images)
        llm = self.transformer.llm
        if labels is not None and loss_on == "supervised":
            rows, targets, _, presents = self._supervised_rows(embeds, labels, attention_mask, position_ids,
                                                               past_key_values, use_cache)
            # logits stay inside the fused head: only the loss is needed here
            loss = linear_cross_entropy(rows, self.lm_head, targets)
            return CausalLMOutput(loss=loss, logits=None, past_key_values=presents)
        if labels is None and last_logits_only:
            # Only the last position's output is wanted (generation): the last layer still writes
            # every position's keys/values to the cache but runs its queries and MLP for one row.
            batch, length = input_ids.shape
            last = paddle.full([batch, 1], length - 1, dtype="int64") if length > 1 else None
            hidden, presents = llm(embeds, attention_mask, position_ids, past_key_values, use_cache,
                                   output_index=last)
            last_hidden = hidden[:, -1]
            logits = None if skip_head else project(last_hidden[:, None], self.lm_head)
            return CausalLMOutput(logits=logits, past_key_values=presents, hidden=last_hidden)
        hidden, presents = llm(embeds, attention_mask, position_ids, past_key_values, use_cache)
        if labels is None and logits_index is not None:
            rows = paddle.gather(hidden.reshape([-1, hidden.shape[-1]]),
                                 paddle.to_tensor(np.asarray(logits_index, dtype=np.int64)))
            logits = None if skip_head else project(rows, self.lm_head)
            return CausalLMOutput(logits=logits, past_key_values=presents, hidden=rows)
        if labels is None:
            return CausalLMOutput(logits=project(hidden, self.lm_head), past_key_values=presents)
        if loss_on != "all":
            raise ValueError(f"loss_on must be 'supervised' or 'all', not {loss_on!r}")
        logits = self.lm_head(hidden)
        shift_labels = labels[:, 1:].reshape([-1])
        keep = paddle.nonzero(shift_labels != IGNORE_INDEX).reshape([-1])
        picked = paddle.gather(logits[:, :-1].reshape([-1, logits.shape[-1]]), keep)
        loss = cross_entropy(picked, paddle.gather(shift_labels, keep))
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=presents)

    def _supervised_rows(self, embeds, labels, attention_mask=None, position_ids=None, past_key_values=None,
                         use_cache=False):
        """Last hidden states at the supervised positions only: (rows [N, H], targets [N] numpy,
        batch row of each [N] numpy, presents)."""
        index, targets = supervised_positions(labels.numpy())
        hidden, presents = self.transformer.llm(embeds, attention_mask, position_ids, past_key_values, use_cache,
                                                output_index=paddle.to_tensor(index))
        flat = targets.reshape(-1)
        keep = np.flatnonzero(flat != IGNORE_INDEX)
        rows = paddle.gather(hidden.reshape([-1, hidden.shape[-1]]), paddle.to_tensor(keep))
        return rows, flat[keep], keep // targets.shape[1], presents

    def sequence_logprobs(self, input_ids, images=None, attention_mask=None, labels=None, image_features=None):
        """Per batch row: (sum of the log-probabilities of its supervised tokens, their count), as
        float64 / int64 numpy [B]; no autograd. Scores captions (data curation) with the training
        forward's supervised-positions head, one [N_supervised x vocab] product per batch.
        `image_features`: as in `embed`, in place of `images`."""
        with paddle.no_grad():
            rows, targets, batch_row, _ = self._supervised_rows(self.embed(input_ids, images, image_features),
                                                                labels, attention_mask)
            logprobs = linear_target_logprobs(rows, self.lm_head, targets)
        size = int(input_ids.shape[0])
        return (np.bincount(batch_row, weights=logprobs, minlength=size),
                np.bincount(batch_row, minlength=size).astype(np.int64))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(int(np.prod(p.shape)) for p in self.parameters()
                   if not (trainable_only and p.stop_gradient))


def supervised_positions(labels_np: np.ndarray):
    """Positions whose next-token prediction is supervised, per row.

    Returns (index [B, Q] int64, targets [B, Q] int64): position p of row b predicts
    labels[b, p + 1]; rows with fewer than Q positions are padded with a repeat of a real position
    and target -100.
    """
    need = labels_np[:, 1:] != IGNORE_INDEX
    if not need.any():
        raise ValueError("no supervised position in the batch (every label is -100)")
    width = int(need.sum(axis=1).max())
    index = np.zeros((len(labels_np), width), dtype=np.int64)
    targets = np.full((len(labels_np), width), IGNORE_INDEX, dtype=np.int64)
    for row, mask in enumerate(need):
        pos = np.flatnonzero(mask)
        if len(pos):
            index[row, :len(pos)] = pos
            index[row, len(pos):] = pos[-1]
            targets[row, :len(pos)] = labels_np[row, pos + 1]
    return index, targets


def image_span_rows(cfg: MgenVLConfig, input_ids_np: np.ndarray) -> np.ndarray:
    """Flat row indices ([n_images * n_queries]) of the placeholder rows, spans in row-major order.

    Validates every span: `<img>`, exactly n_queries rows, `</img>`. (A function of the config
    alone: the exported engine, deploy/engine.py, finds the spans with it too.)
    """
    batch, length = input_ids_np.shape
    flat = input_ids_np.reshape(-1)
    starts = np.flatnonzero(flat == cfg.image_start_id)
    ends = np.flatnonzero(flat == cfg.image_end_id)
    n = cfg.visual.n_queries
    if len(starts) != len(ends) or np.any(ends - starts != n + 1) or np.any(starts // length != ends // length):
        raise ValueError(
            f"malformed image span: {len(starts)} <img> and {len(ends)} </img> tokens; each "
            f"<img> must be followed by exactly {n} placeholder tokens and </img> in the same row")
    return (starts[:, None] + 1 + np.arange(n)[None, :]).reshape(-1)
