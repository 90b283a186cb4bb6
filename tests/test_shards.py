"""paddle_caption.shards, the one protocol of sharded output: resume after a torn line, the rank-0
wait, the round-robin merge (prediction and curation test it through their runs)."""
from __future__ import annotations

import json

import pytest

from paddle_caption import shards
from paddle_caption.runtime import UserError


def test_round_robin_merge_equals_one_process_after_a_resumed_shard(tmp_path):
    out = tmp_path / "stats.jsonl"
    items = [{"i": i, "caption": f"卡通风格{i}"} for i in range(7)]
    rank1 = shards.shard_path(out, 1, 2)
    with shards.ShardWriter(rank1, "fp") as writer:
        writer.add([items[1]])
    with open(rank1, "a", encoding="utf-8") as handle:  # killed mid-line
        handle.write('{"i": 3, "capt')
    state = shards.read_shard(rank1)
    assert state.fingerprint == "fp" and state.count == 1 and not state.complete
    assert list(shards.share(items, 1, 2))[state.count:] == [items[3], items[5]]
    with shards.ShardWriter(rank1, "fp", resume=state) as writer:  # cuts the torn line, appends
        writer.add([items[3], items[5]])
        writer.finish(3)
    with shards.ShardWriter(shards.shard_path(out, 0, 2), "fp") as writer:
        writer.add(list(shards.share(items, 0, 2)))
        writer.finish(4)
    assert shards.merge_round_robin(out, 2, "fp", timeout=1) == 7
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == items
    assert not list(tmp_path.glob("*.partial*"))


def test_rank_0_refuses_a_wrong_sized_shard_and_waits_past_a_stale_one(tmp_path):
    out = tmp_path / "results.txt"
    with shards.ShardWriter(shards.shard_path(out, 1, 2), "fp") as writer:
        writer.add([["b", "caption", ""]])
        writer.finish(1)
    with pytest.raises(UserError, match=r"rank1-of-2: complete but holds 1 items, not its share of 2"):
        shards.wait_for_shards(out, [1], 2, 4, "fp", timeout=1)
    with pytest.raises(UserError, match=r"timed out .*rank1-of-2"):  # another run's shard is not merged
        shards.wait_for_shards(out, [1], 2, 2, "this run", timeout=0.01, poll_seconds=0.01)
    state = shards.wait_for_shards(out, [1], 2, 2, "fp", timeout=1, keep_items=True)[1]
    assert state.keyed() == {"b": ("caption", "")}


def test_a_shard_of_another_format_is_a_one_line_error(tmp_path):
    path = tmp_path / "x.partial"
    path.write_text('{"format": "something/1"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="not a paddle_caption.shard/1 shard file"):
        shards.read_shard(path)
