"""Precision as a model setting: built directly in bfloat16, lazily, saved and loaded shard by shard
in its own dtype, and refused (one line) where the device cannot compute in it."""
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


def bits(model) -> dict:
    """Every tensor's raw bits (bfloat16 as uint16) and dtype."""
    return {k: (str(v.dtype), v.numpy().copy()) for k, v in model.state_dict().items()}


def test_default_dtype_is_scoped_and_restored_on_error():
    from paddle_caption.model.precision import default_dtype

    before = paddle.get_default_dtype()
    with pytest.raises(RuntimeError):
        with default_dtype("bfloat16"):
            assert paddle.nn.Linear(2, 2).weight.dtype == paddle.bfloat16
            raise RuntimeError("boom")
    assert paddle.get_default_dtype() == before
    with pytest.raises(UserError, match="dtype must be one of"):
        with default_dtype("int8"):
            pass


def test_bfloat16_model_directory_round_trips_bit_for_bit(tmp_path):
    from safetensors import safe_open

    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(5)
    model = MgenVLForCausalLM.from_config(small_config(), dtype="bfloat16")
    assert {str(p.dtype) for p in model.parameters()} == {"paddle.bfloat16"}  # norms included (precision.py)
    model.save_pretrained(tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(int(p.numel()) * 2 for p in model.parameters())
    with safe_open(str(shards[0]), framework="paddle") as f:  # the safetensors package reads our files
        name = next(iter(f.keys()))
        assert f.get_tensor(name).dtype == paddle.bfloat16
        np.testing.assert_array_equal(f.get_tensor(name).numpy(), model.state_dict()[name].numpy())

    loaded = MgenVLForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    expected, got = bits(model), bits(loaded)
    assert expected.keys() == got.keys()
    for key, (dtype, array) in expected.items():
        assert got[key][0] == dtype == "paddle.bfloat16"
        np.testing.assert_array_equal(got[key][1], array, err_msg=key)


def test_a_stored_dtype_loads_as_float32_on_cpu_unless_asked(tmp_path):
    """On a CPU (no bfloat16 matmul) a bfloat16 checkpoint loads as float32 by default; asking for a
    dtype casts one tensor at a time, either way round."""
    from paddle_caption.model.weights_io import checkpoint_dtype
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    paddle.seed(6)
    model = MgenVLForCausalLM.from_config(small_config(), dtype="bfloat16")
    model.save_pretrained(tmp_path / "bf16")
    assert checkpoint_dtype(tmp_path / "bf16") == "bfloat16"
    as_float = MgenVLForCausalLM.from_pretrained(tmp_path / "bf16")
    assert as_float.dtype == "float32"
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(as_float.state_dict()[key].numpy(), value.astype("float32").numpy())
    as_float.save_pretrained(tmp_path / "fp32")
    again = MgenVLForCausalLM.from_pretrained(tmp_path / "fp32", dtype="bfloat16")
    for key, (_, array) in bits(model).items():
        np.testing.assert_array_equal(again.state_dict()[key].numpy(), array)


def test_safetensors_package_files_load_and_corrupt_files_are_refused(tmp_path):
    from safetensors.paddle import save_file

    from paddle_caption.model.weights_io import weight_files
    from paddle_caption.model.safetensors_io import SafetensorsReader

    tensors = {"a": paddle.randn([3, 4]), "b": paddle.randn([5]).astype("bfloat16"),
               "c": paddle.arange(6, dtype="int64").reshape([2, 3])}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "np"})
    with SafetensorsReader(tmp_path / "x.safetensors") as reader:
        for name, tensor in tensors.items():
            read = reader.read_tensor(name)
            assert read.dtype == tensor.dtype
            np.testing.assert_array_equal(read.numpy(), tensor.numpy())
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(UserError, match="cut.safetensors: truncated"):
        SafetensorsReader(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(UserError, match="junk.safetensors: not a readable safetensors file"):
        SafetensorsReader(tmp_path / "junk.safetensors")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.safetensors.index.json").write_text('{"weight_map": {"a": "gone.safetensors"}}')
    with pytest.raises(UserError, match="lists shard gone.safetensors, which is missing"):
        weight_files(tmp_path / "d")


def _expected_parameter_count(cfg: dict) -> int:
    """Qwen-VL's parameter count from the config's numbers alone (upstream's module shapes)."""
    h, v, layers, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    f = inter // 2
    llm_layer = h + (h * 3 * h + 3 * h) + h * h + h + 3 * h * f  # ln_1, c_attn(+bias), c_proj, ln_2, w1/w2/c_proj
    llm = v * h + layers * llm_layer + h + h * v  # wte, blocks, ln_f, lm_head
    vis = cfg["visual"]
    w, p, d = vis["width"], vis["patch_size"], vis["output_dim"]
    m = int(w * vis["mlp_ratio"])
    vit_layer = 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + 2 * w + (w * m + m) + (m * w + w)
    vit = w * 3 * p * p + 256 * w + 2 * w + vis["layers"] * vit_layer
    resampler = 256 * d * 2 + w * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d * 2
    return llm + vit + resampler + 2 * d + d * d  # + ln_post, proj


def test_the_7b_config_builds_lazily_with_its_exact_parameter_count():
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    path = ROOT / "config/model/qwen-vl-chat-7b.json"
    expected = _expected_parameter_count(json.loads(path.read_text()))
    assert 9.6e9 < expected < 9.7e9

    def rss():
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    before = rss()
    model = MgenVLForCausalLM.from_config(MgenVLConfig.from_pretrained(path), dtype="bfloat16", lazy=True)
    grown = rss() - before
    assert model.num_parameters() == expected
    assert grown < 64 << 20, f"a lazy build must not allocate weights ({grown / 2**20:.0f} MB grew)"
    assert not any(p._is_initialized() for p in model.parameters())
    assert {str(p.dtype) for p in model.parameters()} == {"paddle.bfloat16"}


def test_bfloat16_compute_on_cpu_is_a_one_line_error_naming_the_fix():
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM

    model = MgenVLForCausalLM.from_config(small_config(), dtype="bfloat16")
    with pytest.raises(UserError) as err:
        model(paddle.to_tensor([[1, 2, 3]]))
    message = str(err.value)
    assert "\n" not in message and "bfloat16" in message and "float32 on CPU" in message


@pytest.mark.slow
def test_loading_a_sharded_bfloat16_checkpoint_peaks_near_its_size(tmp_path):
    """Loose version of bench/load_checkpoint.py's target (1.5x): a fresh process loading a
    ~125 MB bfloat16 checkpoint in 3 shards stays under 2x its size above its pre-load RSS."""
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, "bench/load_checkpoint.py", "--layers", "4", "--hidden", "512",
                    "--shard_mb", "48", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    report = json.loads(out.read_text())
    row = report["rows"][0]
    assert report["shards"] >= 3 and report["checkpoint_bytes"] > 100e6
    assert row["bit_identical"]
    assert row["ratio"] < 2.0, row
