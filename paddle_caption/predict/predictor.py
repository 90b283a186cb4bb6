"""The Predictor: one loaded model, its tokenizer and training prompt, captioning batches of images.

Every caption the kit writes goes through it: `predict_batch.py`, evaluation during training, the
demo and the caption service. Images are preprocessed float32 arrays [3, S, S] (`preprocess`);
each image gets the model's single-image training prompt unless per-image prompt ids are given.
A batch is encoded once, in the prefill of `decoding.generate` (left padding, KV cache,
finished rows leave the batch), so greedy output does not depend on the batch. With a `drafter`
(`decoding.drafting.load_drafter`), greedy decoding is speculative: same tokens, fewer forwards.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import numpy as np

from ..data.images import preprocess_image
from ..data.prompts import PromptTemplate, load_template
from ..data.samples import build_prompt_ids
from ..decoding.config import GenerationConfig
from ..runtime import UserError

# Characters that some reader would take as a column or line break inside a caption.
_BREAKS = re.compile(r"[\t\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")


def clean_caption(text: str) -> str:
    """One submission field: no tab or line break inside, no surrounding whitespace."""
    return _BREAKS.sub(" ", text).strip()


class Predictor:
    def __init__(self, model, tokenizer, template: PromptTemplate, gen_config: GenerationConfig | None = None,
                 source: str = "in-memory model", drafter=None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.drafter = drafter  # None: plain decoding
        self.gen_config = self.fill_stop_and_pad_ids(gen_config or GenerationConfig())
        self.prompt_ids = build_prompt_ids(tokenizer, template)
        self.image_size = int(model.config.visual.image_size)
        self.source = source  # what the model is, for the resume/merge fingerprint

    def with_drafter(self, drafter) -> "Predictor":
        """This predictor (same model, tokenizer, prompt and settings) decoding with `drafter`."""
        other = copy.copy(self)
        other.drafter = drafter
        return other

    def fill_stop_and_pad_ids(self, config: GenerationConfig) -> GenerationConfig:
        """`config` with this tokenizer's stop and pad ids where it sets none (a config is valid
        once made: `GenerationConfig` checks itself)."""
        return config.with_tokenizer(self.tokenizer)

    def preprocess(self, img) -> np.ndarray:
        """A decoded image -> the float32 array [3, S, S] the model reads."""
        return preprocess_image(img, self.image_size)

    def pixels(self, images: list[np.ndarray]):
        """Preprocessed images -> one tensor [n, 3, S, S] in the model's dtype (None for none): the
        step every caption takes to the model, here and in the caption service's engine."""
        import paddle

        if not images:
            return None
        return paddle.to_tensor(np.stack(images)).astype(self.model.dtype)

    def generate_ids(self, images: list[np.ndarray], prompts: list[list[int]] | None = None,
                     config: GenerationConfig | None = None, stats=None) -> list[list[int]]:
        """New token ids per image (stop id excluded); the images are encoded once, as one batch.
        `stats` (a `SpeculationStats`) accumulates what drafting did."""
        from ..decoding.generate import generate

        if not images:
            return []
        prompts = [self.prompt_ids] * len(images) if prompts is None else prompts
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        config = self.gen_config if config is None else self.fill_stop_and_pad_ids(config)
        return generate(self.model, [list(p) for p in prompts], self.pixels(images), config, self.drafter, stats)

    def decode(self, ids: list[int]) -> str:
        return clean_caption(self.tokenizer.decode(ids, skip_special_tokens=True))

    def caption_batch(self, images: list[np.ndarray], prompts: list[list[int]] | None = None,
                      config=None) -> list[str]:
        return [self.decode(ids) for ids in self.generate_ids(images, prompts, config)]


ENGINES = ("dygraph", "inference")


def resolve_engine(model_dir: str | os.PathLike, engine: str | None) -> str:
    """The engine for MODEL_DIR: `engine` if given (checked against what the directory holds),
    else what it holds: an exported directory (manifest.json, tools/export_model.py) means
    "inference" (Paddle Inference), a checkpoint means "dygraph" (the eager model)."""
    from ..deploy.export import MANIFEST, is_export_dir

    exported = is_export_dir(model_dir)
    if engine is None:
        return "inference" if exported else "dygraph"
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "inference" and not exported:
        raise UserError(f"--engine inference needs an exported directory (with {MANIFEST}); {model_dir} is a "
                        "checkpoint: export it first with tools/export_model.py MODEL_DIR OUT_DIR")
    if engine == "dygraph" and exported:
        raise UserError(f"--engine dygraph needs a model directory with weights; {model_dir} is an exported "
                        "directory (Paddle Inference graphs): use --engine inference or the source checkpoint")
    return engine


def load_predictor(model_dir: str | os.PathLike, gen_config: GenerationConfig | None = None,
                   prompt_file: str | None = None, system_file: str | None = None, dtype: str | None = None,
                   speculative: str = "none", draft_source=None, num_draft_tokens: int | None = None,
                   log=None, engine: str | None = None) -> Predictor:
    """Load MODEL_DIR (config.json + weights [+ prompt.json, qwen.tiktoken]) into a Predictor.

    `engine` (`resolve_engine`): "dygraph" runs the eager model, "inference" an exported directory's
    Paddle Inference graphs (`deploy.engine.InferenceEngine`, in the precision it was exported for);
    default: what MODEL_DIR holds.
    `dtype` (dygraph only): None loads as stored where this device computes in it, else float32
    (`precision.default_load_dtype`); a dtype this device cannot compute in (bfloat16/float16 on a
    CPU) is refused in one line before anything loads. `speculative` "retrieval" drafts from
    `draft_source` (a captions file or datastore directory; default MODEL_DIR/draft_datastore),
    "heads" from the model's draft heads, "hybrid" from both, see `decoding.drafting.load_drafter`."""
    from ..decoding.drafting import DEFAULT_DRAFT_TOKENS, load_drafter
    from ..tokenizer import QWenVLTokenizer

    if dtype is not None:  # before anything is read
        from ..model.precision import require_compute

        require_compute(dtype, "--dtype")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    engine = resolve_engine(model_dir, engine)
    if engine == "inference" and dtype is not None:
        raise UserError("--dtype applies to --engine dygraph; an exported directory runs in the precision it "
                        "was exported for (tools/export_model.py --precision)")
    template = load_template(model_dir, prompt_file, system_file)  # prompt errors before the slow load
    model = _load_inference(model_dir) if engine == "inference" else _load_dygraph(model_dir, dtype)
    try:
        tokenizer = QWenVLTokenizer.for_model(model.config, model_dir)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer of {model_dir}: {err}") from None
    drafter = load_drafter(speculative, model_dir, tokenizer, draft_source,
                           num_draft_tokens or DEFAULT_DRAFT_TOKENS, log=log, model=model)
    return Predictor(model, tokenizer, template, gen_config, source=model_dir_signature(model_dir),
                     drafter=drafter)


def _load_dygraph(model_dir: Path, dtype: str | None):
    from ..decoding.output_head import keep_transposed_head
    from ..model.mgen_vl import MgenVLForCausalLM

    try:
        model = MgenVLForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model {model_dir}: {err}") from None
    keep_transposed_head(model.lm_head)  # this model only predicts: the head's fast few-rows layout stays
    return model


def _load_inference(model_dir: Path):
    from ..deploy.engine import InferenceEngine

    try:
        return InferenceEngine(model_dir)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot load exported model {model_dir}: {err}") from None


def model_dir_signature(model_dir: Path) -> str:
    """Path + size and mtime of every file in the model directory: changes when the model does."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    return json.dumps([str(model_dir.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
                                                   for p in files])
