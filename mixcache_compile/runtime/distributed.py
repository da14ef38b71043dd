"""Rank-consistent decisions under ``torch.distributed``.

Note [rank-consistent decisions]: with context parallelism each rank holds a shard of the
sequence, so every indicator computed on a rank is a partial value. Ranks that decided from
their own partial values could take different actions, run different collectives inside the
model, and hang. Every value a decision reads is therefore reduced across the ranks first:
indicator numerators and denominators are summed (each weighted by the number of elements
its mean ran over, so the ratio is the full-sequence ratio even for unequal shards),
deviations are averaged, and a finite flag sums the ranks' sums (non-finite if any rank's is,
Note [finiteness by sum]).

The reduction runs over ``group``: the ranks that hold shards of one sequence (with
diffusers' context parallelism, the config's flattened ring x ulysses mesh; see
``mixcache_compile/parallel.py``). ``None`` means the default (world) group, which is right
only when every rank works on the same sequence. Without an initialised process group (or
with one rank in the group) these are no-ops.

Note [shard-local caches]: every cached tensor a call reuses must have been computed in the
layout of the live tensor it is combined with (the rank's shard, for sharded streams). A
full-length cached residual added to a sharded live stream would broadcast or raise deep in
the model; ``check_same_layout`` turns it into an error naming both shapes. Plans keep the
layout equal by construction (Note [shard at the stage boundary]); the check is the guard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup if dist.is_available() else object


def _active(group: ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def reduce_sum(t: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    if _active(group):
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def reduce_mean(t: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    if _active(group):
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t = t / dist.get_world_size(group)
    return t


def reduce_ratio(num_den: torch.Tensor, count: int, group: ProcessGroup | None = None) -> tuple[float, float]:
    """``[numerator, denominator]`` of a ratio of two means over ``count`` local elements,
    summed over the group as element-weighted sums (exact for unequal shards too), one fetch.
    Alone, the local values are returned untouched (bit-identical to a run without a group)."""
    values = num_den.detach().float()
    if _active(group):
        values = reduce_sum(values * count, group)
    num, den = values.tolist()
    return num, den


def all_ranks(flag: torch.Tensor, group: ProcessGroup | None = None) -> bool:
    """True only if ``flag`` (a bool tensor) holds on every rank of ``group``."""
    value = flag.to(torch.int32).reshape(1)
    if _active(group):
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def agree_all(local: bool, group: ProcessGroup | None = None) -> bool:
    """``local`` on one process; on several, True only if it holds on every rank of ``group``.

    Takes a host bool, so a single process pays no device read (Note [finite flags off the
    per-call path]); ranks pay one all_reduce, which keeps their fallbacks alike."""
    if not _active(group):
        return local
    return all_ranks(torch.tensor(local), group)


def check_same_layout(live: torch.Tensor, cached: torch.Tensor, what: str) -> None:
    """Raise if a cached tensor does not have the live tensor's shape (Note [shard-local caches])."""
    if cached.shape != live.shape:
        raise RuntimeError(
            f"mixcache: {what}: cached shape {tuple(cached.shape)} does not match the live shape "
            f"{tuple(live.shape)}; a cached tensor from another sequence layout (e.g. a full-length "
            "tensor against a context-parallel shard) must never be combined with a live one"
        )
