"""Rank-consistent decisions under ``torch.distributed``.

Note [rank-consistent decisions]: with context parallelism each rank holds a shard of the
sequence, so every indicator computed on a rank is a partial value. Ranks that decided from
their own partial values could take different actions, run different collectives inside the
model, and hang. Every value a decision reads is therefore reduced across the ranks first:
indicator numerators and denominators are summed (exact for equal shards, since each is a
mean over the rank's shard), deviations are averaged, and "all finite" is the minimum.
Without an initialised process group (or with one rank) these are no-ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _active():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if _active():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / dist.get_world_size()
    return t


def all_ranks(flag: torch.Tensor) -> bool:
    """True only if ``flag`` (a bool tensor) holds on every rank."""
    value = flag.to(torch.int32).reshape(1)
    if _active():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
