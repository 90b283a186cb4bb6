"""What this CPU offers Paddle Inference: oneDNN's bfloat16 path needs AVX512-BF16.

Without the `avx512_bf16` flag oneDNN emulates bfloat16 (or refuses it), which is slower than
float32, so a bfloat16 export or engine is refused in one line there instead.
"""
from __future__ import annotations

from pathlib import Path

from ..runtime import UserError

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The flags of the first processor in /proc/cpuinfo (empty where there is none)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_avx512_bf16() -> bool:
    return "avx512_bf16" in cpu_flags()


def require_precision_support(precision: str) -> None:
    """Refuse, in one line, a precision this CPU cannot run fast."""
    if precision == "bfloat16" and not has_avx512_bf16():
        raise UserError("precision bfloat16 needs a CPU with AVX512-BF16 (flag avx512_bf16 in /proc/cpuinfo, "
                        "e.g. Intel Cooper Lake / Sapphire Rapids, AMD Zen 4); this CPU has none: use float32")
