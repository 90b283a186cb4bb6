"""Image decoding, verification and model preprocessing, shared by conversion, training and prediction."""
from __future__ import annotations

import binascii
import io
import warnings

import numpy as np
import pybase64
from PIL import Image

# CLIP normalisation, as Qwen-VL's image transform.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

# The limits every entry point puts on an image to caption (conversion, curation's cleaning,
# prediction, the service), declared once here; each is a flag of those entry points.
# - A side below MIN_IMAGE_SIDE pixels leaves too little for the 448-pixel model input to show.
# - Large photos are captioned, not refused: they are decoded at a reduced scale (DECODE_SIDE, below).
#   Only a decompression bomb is refused, read from the header before any pixel is decoded: more than
#   MAX_IMAGE_PIXELS declared pixels (67 MP: a 24 MP camera photo passes; PIL's own bomb guard, which
#   stays on, warns at 89 MP), or, for an image above RATIO_CHECK_PIXELS, more than
#   MAX_COMPRESSION_RATIO bytes of RGB pixels per byte of payload (a real 24 MP JPEG photo is ~10-40;
#   a flat-colour one a few hundred; a bomb's tiny payload declaring a huge canvas far more).
MIN_IMAGE_SIDE = 32
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
MAX_COMPRESSION_RATIO = 1000
RATIO_CHECK_PIXELS = 4096 * 4096
# Images are decoded at the smallest scale that keeps both sides >= DECODE_SIDE (the model needs
# 448; twice that leaves the bicubic resize its headroom). A JPEG is scaled inside libjpeg's IDCT
# (PIL `Image.draft`: 1/2, 1/4 or 1/8), so memory is that of the reduced image; other formats are
# decoded whole, then reduced (`Image.reduce`), so their memory is bounded by MAX_IMAGE_PIXELS.
DECODE_SIDE = 1024


class ImageRejected(ValueError):
    """An image payload that cannot be used; `reason` is a short ledger code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def b64decode_strict(payload: str | bytes) -> bytes:
    """Strict base64 (no whitespace, exact padding), as `base64.b64decode(validate=True)` decides.

    pybase64 (SIMD) accepts and rejects exactly what the standard library does (tested) and is ~25x
    faster on a 20 kB image, which was ~15% of a row's cost in label conversion.
    """
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageRejected("bad_base64", str(err)) from None


VERIFY_MODES = ("full", "fast", "header")


def _open_checked(data: bytes, *, max_pixels: int, min_side: int, mode: str, decode_side: int = 0,
                  max_ratio: float = MAX_COMPRESSION_RATIO, color: str = "RGB") -> tuple[Image.Image, tuple[int, int]]:
    """Open image bytes and check them as `mode` says: (image, its (width, height) from the
    header), or ImageRejected. (In "fast" mode the returned image is the 1/8-scale draft.)

    The header is checked against `max_pixels` before any pixel is decoded, so a 20000x20000
    payload is refused without allocating it. Modes:
    - "full": PIL's structural verify, then every pixel decoded at full size;
    - "decode": every pixel decoded, without the verify pass (for images already verified);
    - "fast": as "full", but a JPEG is decoded at 1/8 scale and as luma only (PIL draft mode).
      libjpeg still entropy-decodes every component of every block, so a truncated or corrupt JPEG
      is rejected just the same (tested against "full" on truncated and damaged JPEGs), but most of
      the IDCT, the chroma upsampling and the colour conversion are skipped (~3x faster than "full";
      luma only saves ~15% over 1/8-scale RGB). Other formats are checked as in "full";
    - "header": format and size only (a payload cut after its header passes).
    With `decode_side` ("full" and "decode"), the image is decoded at the smallest scale that keeps
    both sides >= decode_side (see DECODE_SIDE); the size returned is still the header's.
    """
    if not data:
        raise ImageRejected("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected("too_many_pixels", f"{width}x{height}")
            if width * height > RATIO_CHECK_PIXELS and width * height * 3 > max_ratio * len(data):
                raise ImageRejected("too_many_pixels", f"{width}x{height} from {len(data)} bytes: more than "
                                                       f"{max_ratio:g} pixel bytes per payload byte (a decompression bomb)")
            if mode == "fast" and img.format == "JPEG":
                img.draft("L", (1, 1))  # smallest DCT scale libjpeg offers (1/8), luma only
            elif mode in ("full", "fast"):
                img.verify()  # structural check; the image must be reopened afterwards
                img = Image.open(io.BytesIO(data))
            if decode_side and mode in ("full", "decode") and img.format == "JPEG":
                img.draft(color, (decode_side, decode_side))  # DCT scaling: only the reduced image is allocated
            if mode != "header":
                img.load()
            if decode_side and mode in ("full", "decode"):
                factor = min(img.size) // decode_side
                if factor >= 2:
                    img = img.reduce(factor)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected("too_many_pixels", str(err)) from None
    except Exception as err:  # PIL raises many types for corrupt data
        raise ImageRejected("undecodable_image", f"{type(err).__name__}: {err}") from None
    if min(width, height) < min_side:
        raise ImageRejected("image_too_small", f"{width}x{height} < {min_side}")
    return img, (width, height)


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 1, verify: bool = True,
                 decode_side: int = DECODE_SIDE, max_ratio: float = MAX_COMPRESSION_RATIO,
                 color: str = "RGB") -> Image.Image:
    """Decode image bytes into an RGB PIL image, or raise ImageRejected: the one image loader of
    conversion, training, prediction, the service and curation. With `verify`, PIL's structural check
    runs first (a truncated JPEG whose header is fine is still a reject). An image larger than
    `decode_side` on both sides comes back reduced (by an integer factor, at most to decode_side; 0:
    full size); `min_side` and `max_pixels` apply to the size in the header. `color="L"` returns
    luma only (a JPEG then skips chroma upsampling and colour conversion: perceptual hashes)."""
    img, _ = _open_checked(data, max_pixels=max_pixels, min_side=min_side, mode="full" if verify else "decode",
                           decode_side=decode_side, max_ratio=max_ratio, color=color)
    return img if img.mode == color else img.convert(color)


def probe_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = 1,
                verify: str = "fast", max_ratio: float = MAX_COMPRESSION_RATIO) -> tuple[int, int]:
    """Check image bytes for bulk cleaning, where the pixels are not needed, and return
    (width, height), or raise ImageRejected. `verify` is "full", "fast" or "header" (see
    `_open_checked`); "fast" rejects exactly what "full" rejects."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    return _open_checked(data, max_pixels=max_pixels, min_side=min_side, mode=verify, max_ratio=max_ratio)[1]


def preprocess_image(img: Image.Image, image_size: int) -> np.ndarray:
    """RGB PIL image -> float32 [3, S, S]: bicubic resize, scale to [0,1], CLIP mean/std."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = img.resize((image_size, image_size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
