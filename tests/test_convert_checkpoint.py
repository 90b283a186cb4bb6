"""tools/convert_checkpoint.py: Hugging Face Qwen-VL (PyTorch names and orientations, safetensors, no
PyTorch) and PaddleMIX pickles into our sharded safetensors model directory, both ways round."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paddle_caption.runtime import UserError
from tests.conftest import small_config

import paddle
ROOT = Path(__file__).resolve().parents[1]


def hf_shapes(cfg: dict) -> dict:
    """The shape of every tensor of upstream's PyTorch Qwen-VL for a config, from its module
    definitions (nn.Linear(in, out).weight is [out, in]; nn.MultiheadAttention.in_proj_weight is
    [3E, E]; visual.proj is a raw [D, D] parameter) — independent of the converter's table."""
    h, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"] // 2
    vis = cfg["visual"]
    w, p, d = vis["width"], vis["patch_size"], vis["output_dim"]
    m = int(w * vis["mlp_ratio"])
    out = {"transformer.wte.weight": [v, h], "transformer.ln_f.weight": [h], "lm_head.weight": [v, h],
           "transformer.visual.conv1.weight": [w, 3, p, p], "transformer.visual.positional_embedding": [256, w],
           "transformer.visual.ln_pre.weight": [w], "transformer.visual.ln_pre.bias": [w],
           "transformer.visual.attn_pool.query": [256, d], "transformer.visual.attn_pool.pos_embed": [256, d],
           "transformer.visual.attn_pool.kv_proj.weight": [d, w],
           "transformer.visual.attn_pool.attn.in_proj_weight": [3 * d, d],
           "transformer.visual.attn_pool.attn.in_proj_bias": [3 * d],
           "transformer.visual.attn_pool.attn.out_proj.weight": [d, d],
           "transformer.visual.attn_pool.attn.out_proj.bias": [d],
           "transformer.visual.ln_post.weight": [d], "transformer.visual.ln_post.bias": [d],
           "transformer.visual.proj": [d, d]}
    for ln in ("ln_q", "ln_kv"):
        out.update({f"transformer.visual.attn_pool.{ln}.weight": [d], f"transformer.visual.attn_pool.{ln}.bias": [d]})
    for i in range(cfg["num_hidden_layers"]):
        b = f"transformer.h.{i}."
        out.update({b + "ln_1.weight": [h], b + "ln_2.weight": [h], b + "attn.c_attn.weight": [3 * h, h],
                    b + "attn.c_attn.bias": [3 * h], b + "attn.c_proj.weight": [h, h],
                    b + "mlp.w1.weight": [f, h], b + "mlp.w2.weight": [f, h], b + "mlp.c_proj.weight": [h, f]})
    for i in range(vis["layers"]):
        b = f"transformer.visual.transformer.resblocks.{i}."
        out.update({b + "ln_1.weight": [w], b + "ln_1.bias": [w], b + "ln_2.weight": [w], b + "ln_2.bias": [w],
                    b + "attn.in_proj.weight": [3 * w, w], b + "attn.in_proj.bias": [3 * w],
                    b + "attn.out_proj.weight": [w, w], b + "attn.out_proj.bias": [w],
                    b + "mlp.c_fc.weight": [m, w], b + "mlp.c_fc.bias": [m],
                    b + "mlp.c_proj.weight": [w, m], b + "mlp.c_proj.bias": [w]})
    return out


def read_all(directory: Path) -> dict:
    """{name: (dtype, numpy array)} with the safetensors package's own numpy reader (no PyTorch)."""
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="paddle") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                out[key] = (str(tensor.dtype), tensor.numpy())
    return out


@pytest.fixture(scope="module")
def hf_fixture(tmp_path_factory, reference_model):
    """The PaddleMIX reference model written in the Hugging Face layout (bfloat16 and float32)."""
    from paddle_caption.model.hf_layout import save_hf_layout
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    root = tmp_path_factory.mktemp("hf")
    save_hf_layout(reference_model, root / "fp32", max_shard_bytes=700_000)
    bf16 = MgenVLForCausalLM.from_config(reference_model.config, dtype="bfloat16")
    bf16.load_weights(reference_model.state_dict())
    save_hf_layout(bf16, root / "bf16", max_shard_bytes=700_000)
    return root, bf16


def test_the_hf_writer_produces_upstream_names_shapes_and_config(hf_fixture, reference_dir):
    root, _ = hf_fixture
    config = json.loads((reference_dir / "config.json").read_text())
    written = read_all(root / "fp32")
    assert {k: list(v[1].shape) for k, v in written.items()} == hf_shapes(config)
    assert (root / "fp32" / "model.safetensors.index.json").is_file()
    hf_config = json.loads((root / "fp32" / "config.json").read_text())
    assert hf_config["visual"]["image_start_id"] == 990 and "image_start_id" not in {k for k in hf_config if k != "visual"}
    assert hf_config["model_type"] == "qwen" and hf_config["torch_dtype"] == "float32"
    # torch semantics on the written tensors: lm_head logits = h @ Wᵀ, and MultiheadAttention's q = x @ W[:D]ᵀ + b[:D]
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    model = MgenVLForCausalLM.from_pretrained(reference_dir)
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_allclose(x @ written["lm_head.weight"][1].T,
                               model.lm_head(paddle.to_tensor(x)).numpy(), rtol=1e-5, atol=1e-5)
    w_in, b_in = (written[f"transformer.visual.attn_pool.attn.in_proj_{p}"][1] for p in ("weight", "bias"))
    np.testing.assert_allclose(x @ w_in[:128].T + b_in[:128],
                               model.visual.attn_pool.attn._project(paddle.to_tensor(x[None]), 0).numpy()
                               .transpose(0, 2, 1, 3).reshape(3, 128), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source,dtype", [("fp32", None), ("bf16", None), ("fp32", "bfloat16")])
def test_hf_checkpoints_convert_to_the_same_model(hf_fixture, reference_model, reference_io, tmp_path, source, dtype):
    from paddle_caption.model.import_weights import convert
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    root, bf16 = hf_fixture
    out = convert(root / source, tmp_path / "ours", dtype=dtype, max_shard_bytes=900_000, progress=False,
                  log=lambda *_: None)
    info = json.loads((out / "conversion_info.json").read_text())
    want = dtype or {"fp32": "float32", "bf16": "bfloat16"}[source]
    assert info["layout"] == "huggingface" and info["dtype"] == want and info["tensors"] == 69
    assert {d for d, _ in read_all(out).values()} == {f"paddle.{want}"}
    assert (out / "qwen.tiktoken").is_file() and json.loads((out / "tokenizer_config.json").read_text())["img_start_id"] == 990
    loaded = MgenVLForCausalLM.from_pretrained(out, dtype=want)
    source_model = reference_model if want == "float32" else bf16
    if dtype == "bfloat16":  # converted down: equal to Paddle's own cast of the source
        expected = {k: v.astype("bfloat16").numpy() for k, v in reference_model.state_dict().items()}
    else:
        expected = {k: v.numpy() for k, v in source_model.state_dict().items()}
    for key, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[key], err_msg=key)
    if want == "float32":  # the converted model reproduces PaddleMIX's logits
        inputs, outputs = reference_io
        with paddle.no_grad():
            logits = loaded(paddle.to_tensor(inputs["input_ids"]), images=paddle.to_tensor(inputs["images"])).logits
        np.testing.assert_allclose(logits.numpy(), outputs["logits"], rtol=0, atol=1e-5)


def test_a_random_model_round_trips_through_the_hf_layout_with_the_same_logits(tmp_path):
    from paddle_caption.model.import_weights import convert
    from paddle_caption.model.hf_layout import save_hf_layout
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(21)
    config = small_config(num_hidden_layers=2, visual={**small_config().visual.__dict__, "layers": 1})
    source = MgenVLForCausalLM(config)
    save_hf_layout(source, tmp_path / "hf")
    back = MgenVLForCausalLM.from_pretrained(convert(tmp_path / "hf", tmp_path / "ours", progress=False,
                                                     log=lambda *_: None))
    span = [config.image_start_id] + [config.image_pad_id] * config.visual.n_queries + [config.image_end_id]
    ids = paddle.to_tensor([[5, 6] + span + [7, 8, 9]])
    images = paddle.to_tensor(np.random.default_rng(2).standard_normal((1, 3, 56, 56)).astype("float32"))
    with paddle.no_grad():
        np.testing.assert_array_equal(back(ids, images=images).logits.numpy(), source(ids, images=images).logits.numpy())


def test_paddlemix_pickles_convert_exactly_as_arrays(reference_model, reference_dir, reference_io, tmp_path):
    import shutil

    from paddle_caption.model.import_weights import convert
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    src = tmp_path / "paddlemix"
    src.mkdir()
    shutil.copy(reference_dir / "config.json", src / "config.json")
    paddle.save(reference_model.state_dict(), str(src / "model_state.pdparams"))
    out = convert(src, tmp_path / "ours", dtype="bfloat16", progress=False, log=lambda *_: None)
    assert json.loads((out / "conversion_info.json").read_text())["format"] == "pickle"
    loaded = MgenVLForCausalLM.from_pretrained(out, dtype="bfloat16")  # safetensors now: no flag needed
    for key, value in reference_model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value.astype("bfloat16").numpy())
    # ours -> HF layout -> ours: identical tensors
    from paddle_caption.model.hf_layout import save_hf_layout

    save_hf_layout(MgenVLForCausalLM.from_pretrained(reference_dir), tmp_path / "hf")
    again = MgenVLForCausalLM.from_pretrained(convert(tmp_path / "hf", tmp_path / "again", progress=False,
                                                      log=lambda *_: None))
    for key, value in reference_model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[key].numpy(), value.numpy())


def test_refusals_name_the_problem(hf_fixture, tmp_path):
    from safetensors.paddle import save_file

    from paddle_caption.model.import_weights import convert

    root, _ = hf_fixture
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty"):
        convert(root / "fp32", tmp_path / "full", progress=False)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((root / "fp32" / "config.json").read_text())
    save_file({"encoder.layer.0.weight": paddle.ones([2])}, str(odd / "model.safetensors"))
    with pytest.raises(UserError, match="neither a Hugging Face Qwen-VL nor a PaddleMIX"):
        convert(odd, tmp_path / "o1", progress=False)
    save_file({"transformer.h.0.attn.unknown.weight": paddle.ones([2])}, str(odd / "model.safetensors"))
    with pytest.raises(UserError, match="unknown Hugging Face Qwen-VL tensor 'transformer.h.0.attn.unknown.weight'"):
        convert(odd, tmp_path / "o2", progress=False)
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no temp directory left behind


def test_cli_is_one_line_on_error(tmp_path):
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", str(tmp_path / "missing"),
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "missing" in proc.stderr


def test_pytorch_bin_checkpoints_convert_without_torch_or_pickle_code(reference_model, reference_io, tmp_path):
    """What Hugging Face's Qwen-VL-Chat ships: pytorch_model-0000i-of-0000n.bin (made with real torch,
    tests/fixtures/qwen_vl_tiny_torch_bin/README.md), bfloat16; converted bit for bit to Paddle's own
    bfloat16 cast of the reference weights, and to float32 with logits near the reference's."""
    import shutil

    from paddle_caption.model.import_weights import convert
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    src = tmp_path / "hf_bin"
    shutil.copytree(Path(__file__).parent / "fixtures" / "qwen_vl_tiny_torch_bin", src)
    (src / "views.bin").unlink()
    out = convert(src, tmp_path / "ours", progress=False, log=lambda *_: None)
    info = json.loads((out / "conversion_info.json").read_text())
    assert (info["format"], info["layout"], info["dtype"], info["tensors"]) == ("pytorch", "huggingface", "bfloat16", 69)
    loaded = MgenVLForCausalLM.from_pretrained(out, dtype="bfloat16")
    for key, value in reference_model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key].numpy(), value.astype("bfloat16").numpy(), err_msg=key)
    as_fp32 = MgenVLForCausalLM.from_pretrained(convert(src, tmp_path / "fp32", dtype="float32", progress=False,
                                                        log=lambda *_: None))
    inputs, outputs = reference_io
    with paddle.no_grad():
        logits = as_fp32(paddle.to_tensor(inputs["input_ids"]), images=paddle.to_tensor(inputs["images"])).logits
    scale = float(np.abs(outputs["logits"]).max())
    assert float(np.abs(logits.numpy() - outputs["logits"]).max()) < 0.05 * scale  # bfloat16 weights


def test_a_pytorch_file_with_foreign_code_is_refused_by_name(reference_dir, tmp_path):
    import pickle
    import shutil
    import zipfile

    from paddle_caption.model.import_weights import convert

    src = tmp_path / "evil"
    src.mkdir()
    shutil.copy(reference_dir / "config.json", src / "config.json")

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, ("true",))

    with zipfile.ZipFile(src / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": Exploit()}, protocol=2))
    with pytest.raises(UserError, match="refusing to unpickle posix.system"):
        convert(src, tmp_path / "out", progress=False, log=lambda *_: None)
    assert not (tmp_path / "out").exists()
