"""The trainer's parallel settings, checked without launching processes (the launched runs are in
test_data_parallel.py)."""
from __future__ import annotations

import pytest

from paddle_caption.runtime import UserError
from paddle_caption.train.config import TrainConfig
from paddle_caption.train.parallel import check_sharding, is_sharded


def test_sharding_is_validated():
    with pytest.raises(UserError, match="sharding must be one of none, stage1, stage2"):
        TrainConfig(model_config="m.json", train_records="r", max_steps=1, sharding="zero3").validate()


@pytest.mark.skipif(__import__("paddle").is_compiled_with_cuda(), reason="a GPU build may run stage 2")
def test_stage2_is_refused_on_cpu_with_paddles_reason():
    with pytest.raises(UserError, match="group_sharded_parallel only support gpu, xpu"):
        check_sharding(2, "stage2")


def test_sharding_without_ranks_is_a_note_not_an_error():
    assert "training unsharded" in check_sharding(1, "stage1")
    assert check_sharding(2, "stage1") is None and check_sharding(2, "none") is None
    assert is_sharded(2, "stage1") and not is_sharded(1, "stage1") and not is_sharded(2, "none")
