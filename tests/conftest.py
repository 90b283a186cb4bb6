"""Shared test fixtures. Paddle is configured (threads, quiet import) before anything imports it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from paddle_caption.runtime import configure_environment

configure_environment()

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE_DIR = FIXTURES / "qwen_vl_tiny_reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference_model():
    from paddle_caption import MgenVLForCausalLM

    return MgenVLForCausalLM.from_pretrained(REFERENCE_DIR)


@pytest.fixture(scope="session")
def reference_io():
    return dict(np.load(REFERENCE_DIR / "inputs.npz")), dict(np.load(REFERENCE_DIR / "outputs.npz"))


def small_config(**overrides):
    """A small random model in the fixture's shape family (vocab 1000, image ids 990-992)."""
    from paddle_caption import MgenVLConfig

    base = MgenVLConfig.from_pretrained(REFERENCE_DIR).to_dict()
    base.update(overrides)
    return MgenVLConfig.from_dict(base)
