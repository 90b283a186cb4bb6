"""Checkpoint pickles read as arrays only: a real torch.save file (made once with torch, see the
fixture's README) read without torch, view semantics included; Paddle pickles through the array-only
unpickler; a pickle naming any other callable refused by name before anything runs."""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from paddle_caption.model.pickle_reader import (UnsafePickleError, is_torch_zip, iter_torch_zip,
                                                load_array_pickle)

BIN = Path(__file__).parent / "fixtures" / "qwen_vl_tiny_torch_bin"


def bf16_bits(values) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (what torch's cast does)."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_views_of_a_real_torch_file_keep_their_values():
    got = {name: (dtype, array) for name, dtype, array in iter_torch_zip(BIN / "views.bin")}
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_array_equal(got["transposed"][1], base.T)
    np.testing.assert_array_equal(got["offset_slice"][1], base[1:3, 2:5])
    np.testing.assert_array_equal(got["shared_a"][1], base)
    np.testing.assert_array_equal(got["shared_b"][1], base.reshape(6, 4))
    assert got["half"][0] == "float16"
    half = got["half"][1]  # torch's float16 linspace rounds its inner points its own way
    assert half.dtype == np.float16 and half[[0, 3, 6]].tolist() == [-2.0, 0.0, 2.0]
    np.testing.assert_allclose(half, np.linspace(-2, 2, 7), atol=2e-3)
    assert got["long"][0] == "int64" and got["long"][1].tolist() == [1, -2, 3 << 40]
    assert got["scalar"][1].shape == () and float(got["scalar"][1]) == 2.5
    assert got["bf16"][0] == "bfloat16"
    np.testing.assert_array_equal(got["bf16"][1], bf16_bits([1.5, -3.25, 1e-3]))
    assert all(a.flags.c_contiguous and a.flags.writeable for _, a in got.values())


def test_the_sharded_bf16_checkpoint_holds_the_reference_weights_in_upstream_names(tmp_path):
    import json

    from safetensors.numpy import load_file

    from paddle_caption import MgenVLForCausalLM
    from paddle_caption.model.hf_layout import save_hf_layout

    index = json.loads((BIN / "pytorch_model.bin.index.json").read_text())
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        assert is_torch_zip(BIN / shard)
        for name, dtype, array in iter_torch_zip(BIN / shard):
            assert dtype == "bfloat16" and index["weight_map"][name] == shard
            got[name] = array
    save_hf_layout(MgenVLForCausalLM.from_pretrained(BIN.parent / "qwen_vl_tiny_reference"), tmp_path / "hf")
    reference = {k: v for f in sorted((tmp_path / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert got.keys() == reference.keys() and len(got) == 69
    for name, value in reference.items():
        np.testing.assert_array_equal(got[name], bf16_bits(value), err_msg=name)


def torch_zip_with(pickled: bytes, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
    return path


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload, name", [
    (Exploit(), "posix.system"),
    ({"w": Exploit()}, "posix.system"),
    ({"w": bytearray(b"x")}, "__builtin__.bytearray"),  # protocol 2 names Python 2 modules
])
def test_any_other_callable_is_refused_by_name(tmp_path, payload, name):
    data = pickle.dumps(payload, protocol=2)
    with pytest.raises(UnsafePickleError, match=f"refusing to unpickle {name}"):
        list(iter_torch_zip(torch_zip_with(data, tmp_path / "evil.bin")))
    (tmp_path / "evil.pdparams").write_bytes(data)
    with pytest.raises(UnsafePickleError, match=f"refusing to unpickle {name}"):
        load_array_pickle(tmp_path / "evil.pdparams")


def test_paddle_pickles_read_as_arrays(tmp_path):
    import paddle

    layer = paddle.nn.Linear(3, 2)
    state = {**layer.state_dict(), "bf": paddle.to_tensor([[1.5, -2.0]]).astype("bfloat16")}
    paddle.save(state, str(tmp_path / "m.pdparams"))
    got = load_array_pickle(tmp_path / "m.pdparams")
    assert got.keys() == {"weight", "bias", "bf"}
    np.testing.assert_array_equal(got["weight"], layer.weight.numpy())
    np.testing.assert_array_equal(got["bf"], state["bf"].numpy())  # bfloat16 bits as uint16
    with open(tmp_path / "list.pdparams", "wb") as handle:
        pickle.dump([np.zeros(2)], handle)
    with pytest.raises(Exception, match="not a state dict"):
        load_array_pickle(tmp_path / "list.pdparams")


def test_a_storage_missing_from_the_zip_is_named(tmp_path):
    source = BIN / "views.bin"
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(tmp_path / "cut.bin", "w") as out:
        for info in archive.infolist():
            if not info.filename.endswith("/data/0"):
                out.writestr(info, archive.read(info))
    with pytest.raises(Exception, match="storage 0 missing"):
        list(iter_torch_zip(tmp_path / "cut.bin"))
    (tmp_path / "legacy.bin").write_bytes(io.BytesIO(pickle.dumps({"a": 1})).getvalue())
    with pytest.raises(Exception, match="not a PyTorch zip checkpoint"):
        list(iter_torch_zip(tmp_path / "legacy.bin"))
