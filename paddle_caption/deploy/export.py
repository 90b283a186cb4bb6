"""Export a model directory as a self-contained deployment directory for Paddle Inference.

    OUT_DIR/
      manifest.json            format, Paddle version, precision, graphs with their inputs/outputs,
                               export time, source, limits (max_total_tokens)
      vision.json/.pdiparams   images -> image features           (Paddle 3 PIR program + parameters)
      prefill.json/.pdiparams  ids, mask, mask bias, image rows, features -> last hidden state + k/v per layer
      decode.json/.pdiparams   ids, mask, mask bias, past k/v per layer -> hidden state of every fed token + new k/v
      lm_head.npy              the output layer's weight [hidden, vocab] float32 (graphs.py: why
                               it runs outside the graphs)
      config.json              the architecture (sizes, special ids, seq_length)
      qwen.tiktoken            the tokenizer's vocabulary (plus the model's tokenizer/generation
                               files when it has them)
      prompt.json              the training prompt (when the model has one)
      draft_datastore/         speculative decoding's datastore (when the model has one)
      draft_heads.*            the model's draft heads (when it has them; drafting runs them in numpy)

The graphs are traced from the float32 model with Paddle's kernels (`graphs.py`); the precision is
how Paddle Inference runs them: float32, or bfloat16 (oneDNN's bfloat16 pass over the same program,
CPUs with AVX512-BF16 only). int8 is refused in one line: no quantisation route of Paddle 3.3.1
gave a usable int8 graph here (INT8_REFUSAL; what was tried in docs/deployment.md). The directory is written under a
temporary name and renamed into place, so OUT_DIR is either complete or absent.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from ..files import read_json_object, write_json
from ..runtime import UserError
from .cpu_features import require_precision_support
from .predictors import PRECISIONS

FORMAT = "paddle_caption.export/2"  # 2: the mask bias is an input of prefill and decode
MANIFEST = "manifest.json"
GRAPH_NAMES = ("vision", "prefill", "decode")
# draft_heads.*: the Medusa heads drafting reads in numpy (model/draft_heads.py): no graph needed
OPTIONAL_FILES = ("prompt.json", "special_tokens_map.json", "generation_config.json", "draft_heads.json",
                  "draft_heads.safetensors")
DATASTORE_DIR = "draft_datastore"
HEAD_FILE = "lm_head.npy"
INT8_REFUSAL = ("precision int8 is not supported: on Paddle 3.3.1 neither dygraph PTQ (paddle.quantization.PTQ: no "
                "dynamic batch; with a fixed one no faster and far off float32) nor the static route "
                "(PostTrainingQuantization: the graphs do not trace in the legacy IR) nor weight-only int8 (no CPU "
                "kernel) gives a usable int8 graph (docs/deployment.md); use float32 or bfloat16")


def is_export_dir(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} is not an exported model directory (no {MANIFEST}): "
                        "export it with tools/export_model.py MODEL_DIR OUT_DIR")
    manifest = read_json_object(path, "export manifest")
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("precision", "graphs", "lm_head", "max_total_tokens"):
        if key not in manifest:
            raise UserError(f"{path}: missing key {key!r}")
    if manifest["precision"] not in PRECISIONS:
        raise UserError(f"{path}: precision {manifest['precision']!r} is not one of {', '.join(PRECISIONS)}")
    return manifest


def graph_specs(cfg) -> dict:
    """The input signature of each graph (None: any size), as `paddle.static.InputSpec`s."""
    from paddle.static import InputSpec

    heads, head_dim, layers = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    size = cfg.visual.image_size
    ids = InputSpec([None, None], "int64", "input_ids")
    mask = InputSpec([None, None], "int64", "attention_mask")
    bias = InputSpec([None, 1, None, None], "float32", "attention_bias")
    past = [InputSpec([None, heads, None, head_dim], "float32", f"past_{kind}_{i}")
            for i in range(layers) for kind in ("key", "value")]
    return {
        "vision": [InputSpec([None, 3, size, size], "float32", "images")],
        "prefill": [ids, mask, bias, InputSpec([None], "int64", "image_rows"),
                    InputSpec([None, cfg.visual.n_queries, cfg.hidden_size], "float32", "image_features")],
        "decode": [ids, mask, bias, past],
    }


def _describe(specs) -> list[dict]:
    flat = []
    for spec in specs:
        for one in (spec if isinstance(spec, list) else [spec]):
            flat.append({"name": one.name, "shape": [None if d in (None, -1) else int(d) for d in one.shape],
                         "dtype": str(one.dtype).replace("paddle.", "")})
    return flat


def _output_names(cfg) -> dict:
    kv = [f"{kind}_{i}" for i in range(cfg.num_hidden_layers) for kind in ("key", "value")]
    return {"vision": ["image_features"], "prefill": ["last_hidden"] + kv, "decode": ["hidden"] + kv}


def save_graphs(model, directory: Path) -> dict:
    """Trace and save the three graphs of `model` (float32, eval) into `directory`; returns the
    manifest's `graphs` entry."""
    import paddle

    from ..model.numpy_bridge import paddle_kernels
    from .graphs import DecodeGraph, PrefillGraph, VisionGraph

    cfg = model.config
    specs = graph_specs(cfg)
    layers = {"vision": VisionGraph(model), "prefill": PrefillGraph(model), "decode": DecodeGraph(model)}
    outputs = _output_names(cfg)
    graphs = {}
    with paddle_kernels():  # the traced graph must hold Paddle's kernels, never the numpy path
        for name in GRAPH_NAMES:
            layer = layers[name]
            layer.eval()
            static = paddle.jit.to_static(layer, input_spec=specs[name], full_graph=True)
            paddle.jit.save(static, str(directory / name))
            graphs[name] = {"program": f"{name}.json", "params": f"{name}.pdiparams",
                            "inputs": _describe(specs[name]), "outputs": outputs[name]}
    return graphs


def copy_assets(model_dir: Path, out: Path, cfg) -> list[str]:
    """config, tokenizer, prompt, generation settings and draft datastore; returns what was copied."""
    from ..tokenizer import QWenVLTokenizer

    cfg.save_pretrained(out)
    QWenVLTokenizer.for_model(cfg, model_dir).save_pretrained(out)  # the model's vocabulary, else the packaged one
    copied = ["config.json", "qwen.tiktoken", "tokenizer_config.json"]
    for name in OPTIONAL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
            copied.append(name)
    if (model_dir / DATASTORE_DIR).is_dir():
        shutil.copytree(model_dir / DATASTORE_DIR, out / DATASTORE_DIR)
        copied.append(DATASTORE_DIR + "/")
    return copied


def export_model(model_dir, out_dir, precision: str = "float32", overwrite: bool = False, log=None) -> dict:
    """Export MODEL_DIR to OUT_DIR (see the module docstring); returns the manifest."""
    import numpy as np
    import paddle

    from ..model.mgen_vl import MgenVLForCausalLM

    log = log or (lambda message: None)
    if precision == "int8":
        raise UserError(INT8_REFUSAL)
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    require_precision_support(precision)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model directory (no config.json)")
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists (pass --overwrite to replace it)")
    start = time.perf_counter()
    try:
        model = MgenVLForCausalLM.from_pretrained(model_dir, dtype="float32")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model {model_dir}: {err}") from None
    cfg = model.config
    log(f"loaded {model_dir} ({model.num_parameters() / 1e6:.1f} M parameters)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        graphs = save_graphs(model, staging)
        np.save(staging / HEAD_FILE, model.lm_head.weight.numpy())
        log(f"traced and saved {', '.join(GRAPH_NAMES)} in {time.perf_counter() - start:.1f} s")
        copied = copy_assets(model_dir, staging, cfg)
        manifest = {
            "format": FORMAT,
            "paddle_version": paddle.__version__,
            "precision": precision,
            "precisions": list(PRECISIONS),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "export_seconds": round(time.perf_counter() - start, 2),
            "source": str(model_dir.resolve()),
            # Dynamic NTK and log-n scaling are fixed to their `total <= seq_length` values in the
            # graphs (graphs.py), so the engine refuses a longer cache.
            "max_total_tokens": int(cfg.seq_length),
            "image_size": int(cfg.visual.image_size),
            "graphs": graphs,
            "lm_head": {"file": HEAD_FILE, "shape": [int(d) for d in model.lm_head.weight.shape]},
            "files": copied,
        }
        write_json(staging / MANIFEST, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"exported {out_dir} ({precision}) in {manifest['export_seconds']} s")
    return manifest
