"""Which process of a multi-process run this is, as `paddle.distributed.launch` tells it.

The launcher sets PADDLE_TRAINER_ID (this rank) and PADDLE_TRAINERS_NUM (the world size) in every
process it starts, on one machine or several (`--ips`). Training and prediction read them here.
"""
from __future__ import annotations

import os

from .runtime import UserError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): the given values, else the launcher's variables, else (0, 1)."""
    rank = rank if rank is not None else _env_int("PADDLE_TRAINER_ID", 0)
    world = world_size if world_size is not None else _env_int("PADDLE_TRAINERS_NUM", 1)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world}")
    return rank, world
