"""Caption-aware image augmentation for training (off by default; the config's `augment` block).

An augmentation must leave the caption true:

* **horizontal flip** swaps the caption's position words (左边 <-> 右边, 左上角 <-> 右上角, ...).
  A caption is flipped only when every 左 / 右 in it belongs to a word of `POSITION_WORDS`; any other
  use ("左转", "右键", a brand name) makes the flip skip, since the table cannot know what the
  mirror image of it says. Symmetric words (左右, 左右两侧) stay as they are. Mirrored text in an
  image is not readable text any more: leave the flip off for ads whose captions quote their text.
* **scale jitter** zooms out: the image is padded by a random margin on each side, with its own
  edge pixels (so a background colour stays the background colour), and the model's resize then
  brings it back: the whole content stays in view, smaller and shifted.
* **brightness / contrast jitter** scales all three channels by one factor (brightness) and blends
  towards the image's mean grey (contrast): channel ratios, hence hue, are kept, so colour words
  stay true (keep the ranges small: a large brightness change turns 白色 into 灰色). No hue jitter.

Each sample's augmentation is a pure function of (seed, epoch, sample index): a resumed run sees
the same images as an uninterrupted one, and DataLoader workers need no shared state.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime import UserError

# Position words and their mirror images. Longest first when matching (左上角 before 左上 before 左).
_PAIRS = [("左上角", "右上角"), ("左下角", "右下角"), ("左半边", "右半边"), ("左半部", "右半部"),
          ("左边", "右边"), ("左侧", "右侧"), ("左上", "右上"), ("左下", "右下"), ("左方", "右方"),
          ("左面", "右面"), ("左端", "右端"), ("左手边", "右手边"), ("靠左", "靠右"), ("偏左", "偏右"),
          ("向左", "向右"), ("朝左", "朝右"), ("左", "右")]
POSITION_WORDS = {**{a: b for a, b in _PAIRS}, **{b: a for a, b in _PAIRS},
                  "左右": "左右", "左右两侧": "左右两侧", "左右两边": "左右两边"}
_BY_LENGTH = sorted(POSITION_WORDS, key=len, reverse=True)
# a lone 左/右 is a position word only before these (左是, 右为, 左: ...); elsewhere it is unknown
_LONE_FOLLOWERS = set("是为有：:，,。的")


@dataclass
class AugmentConfig:
    flip_prob: float = 0.0  # probability of a horizontal flip (skipped when the caption forbids it)
    scale_jitter: float = 0.0  # max margin added on each side, as a fraction of the image side
    brightness: float = 0.0  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.0  # factor drawn from [1 - c, 1 + c]
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.flip_prob or self.scale_jitter or self.brightness or self.contrast)

    def validate(self, source: str = "config: augment") -> "AugmentConfig":
        if not 0 <= self.flip_prob <= 1:
            raise UserError(f"{source}: flip_prob must be in [0, 1]")
        for key in ("scale_jitter", "brightness", "contrast"):
            if not 0 <= getattr(self, key) < 1:
                raise UserError(f"{source}: {key} must be in [0, 1)")
        return self


def flip_caption(caption: str) -> str | None:
    """The caption of the mirrored image, or None when it has a 左/右 the table does not know."""
    out, i = [], 0
    while i < len(caption):
        word = next((w for w in _BY_LENGTH if caption.startswith(w, i)), None)
        if word is None:
            out.append(caption[i])
            i += 1
            continue
        end = i + len(word)
        if word in ("左", "右") and end < len(caption) and caption[end] not in _LONE_FOLLOWERS:
            return None  # 左转, 右键, ...: not a position the table knows
        out.append(POSITION_WORDS[word])
        i = end
    return "".join(out)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def augment_image(img, cfg: AugmentConfig, rng: np.random.Generator, flip: bool):
    """A PIL RGB image with the drawn augmentations (flip decided by the caller, who knows the
    caption). Draws are made in a fixed order whatever is enabled, so enabling one augmentation
    does not change another's draws."""
    from PIL import Image, ImageOps

    margins = rng.uniform(0, cfg.scale_jitter, 4) if cfg.scale_jitter else np.zeros(4)
    brightness = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    contrast = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    if flip:
        img = ImageOps.mirror(img)
    if margins.any():
        arr = np.asarray(img)
        h, w = arr.shape[:2]
        left, right = (margins[:2] * w).astype(int)
        top, bottom = (margins[2:] * h).astype(int)
        img = Image.fromarray(np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge"))
    if cfg.brightness or cfg.contrast:
        arr = np.asarray(img, dtype=np.float32) * brightness
        grey = arr.mean()
        arr = grey + (arr - grey) * contrast
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return img


class CaptionAugmenter:
    """What the dataset calls per item: (image, caption index) -> (augmented image, flipped?)."""

    def __init__(self, cfg: AugmentConfig, captions: list[str]):
        self.cfg = cfg
        self.flipped = [flip_caption(c) for c in captions] if cfg.flip_prob else [None] * len(captions)

    def __call__(self, img, index: int, epoch: int):
        rng = sample_rng(self.cfg.seed, epoch, index)
        flip = rng.random() < self.cfg.flip_prob and self.flipped[index] is not None
        return augment_image(img, self.cfg, rng, flip), flip
