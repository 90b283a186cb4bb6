"""The one image loader: large photos decoded at a reduced scale and captioned; only decompression
bombs refused, by the size their header declares or their compression ratio; the limits are flags."""
from __future__ import annotations

import base64
import io
import struct

import numpy as np
import pytest
from PIL import Image

from paddle_caption.data.images import ImageRejected, decode_image, probe_image


@pytest.fixture(scope="module")
def photo_24mp() -> bytes:
    """A 6000x4000 JPEG (an ordinary camera photo's size) with texture, so it compresses like one."""
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, size=(400, 600, 3), dtype=np.uint8))
    img = small.resize((6000, 4000), Image.BILINEAR)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small valid JPEG whose header (SOF0) is rewritten to declare width x height."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, "JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_a_24mp_jpeg_is_decoded_at_a_reduced_scale(photo_24mp):
    assert probe_image(photo_24mp) == (6000, 4000)  # the converter keeps it (the old 16.7 MP limit refused it)
    img = decode_image(photo_24mp)  # default: the smallest DCT scale keeping both sides >= 1024
    assert img.size == (3000, 2000) and img.mode == "RGB"
    assert decode_image(photo_24mp, decode_side=448).size == (750, 500)  # 1/8: what the model reads is 448
    assert decode_image(photo_24mp, decode_side=448, verify=False).size == (750, 500)


def test_other_formats_are_reduced_after_decoding():
    img = Image.linear_gradient("L").convert("RGB").resize((2400, 2100))
    out = io.BytesIO()
    img.save(out, "PNG")
    assert decode_image(out.getvalue(), decode_side=1000).size == (1200, 1050)  # Image.reduce(2)
    assert decode_image(out.getvalue(), decode_side=0).size == (2400, 2100)


def test_only_decompression_bombs_are_refused():
    for data, detail in [(_jpeg_declaring(9000, 8000), "9000x8000"),  # above max_pixels (67 MP)
                         (_jpeg_declaring(5000, 5000), "decompression bomb")]:  # 25 MP from ~600 bytes
        for check in (lambda d: decode_image(d), lambda d: probe_image(d)):
            with pytest.raises(ImageRejected, match=detail) as err:
                check(data)
            assert err.value.reason == "too_many_pixels"
    # the limits are parameters (and flags of every entry point)
    with pytest.raises(ImageRejected, match="too_many_pixels"):
        probe_image(_jpeg_declaring(3000, 2000), max_pixels=5_000_000)
    assert probe_image(_jpeg_declaring(5000, 5000), max_ratio=1e9, verify="header") == (5000, 5000)


def test_a_24mp_jpeg_gets_a_caption(photo_24mp, tmp_path):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.predict import run
    from paddle_caption.predict.cli import build_parser

    from .conftest import make_model_dir

    tsv = tmp_path / "test.tsv"
    tsv.write_text(f"photo\t{base64.b64encode(photo_24mp).decode()}\n")
    opts = run.PredictOptions(progress=False, poll_seconds=0.01, generation=GenerationConfig(max_new_tokens=3))
    summary = run.predict_file(tsv, tmp_path / "results.txt", make_model_dir(tmp_path / "m"), opts)
    assert (summary["predicted"], summary["rejected"]) == (1, 0)
    assert (tmp_path / "results.txt.rejects").read_text() == ""
    args = build_parser().parse_args(["t", "r", "m", "--max_pixels", "9", "--decode_side", "336",
                                      "--max_compression_ratio", "50"])
    assert (args.max_pixels, args.decode_side, args.max_compression_ratio) == (9, 336, 50.0)
