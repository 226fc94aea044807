"""Thin helpers over torch.distributed that also work with no process group (one process)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the identity in a single process."""
    if enabled():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
