"""The BLOCK / ATTN part of an action (alone, or the cond half's part of a composite CFG
action, Note [action table] in ``policies/protocol.py``): what it reads from the cache and why
it cannot run. Kept apart from ``session.py`` so both uses share one statement."""

from __future__ import annotations

from typing import Any

import torch

from ..policies.protocol import Action, ActionKind
from .cache_store import CacheStore


def cached_list(store: CacheStore, prefix: tuple) -> list[torch.Tensor]:
    values, i = [], 0
    while (t := store.get((*prefix, i))) is not None:
        values.append(t)
        i += 1
    return values


def part_prefixes(branch: str, part: Action | None) -> list[tuple]:
    """The cache-key prefixes a BLOCK / ATTN (part of an) action reads for ``branch``."""
    if part is None:
        return []
    if part.kind is ActionKind.BLOCK:
        return [("res", branch, *part.block_range)]
    if part.kind is ActionKind.ATTN:
        return [("attn", branch, g) for g in part.attn_blocks]
    return []


def part_tensors(store: CacheStore, branch: str, part: Action | None) -> list[torch.Tensor]:
    """The cached tensors a BLOCK / ATTN (part of an) action reads for ``branch``."""
    return [t for prefix in part_prefixes(branch, part) for t in cached_list(store, prefix)]


def part_missing(store: CacheStore, info: Any, branch: str, part: Action, after_probe: int | None) -> str | None:
    """Why a BLOCK / ATTN (part of an) action cannot run on ``branch``'s caches, or None."""
    if part.kind is ActionKind.BLOCK:
        a, e = part.block_range
        if (a, e) not in info.reusable_ranges:
            return f"blocks {a}-{e} cannot be skipped (not inside one chain {info.chain_bounds}, or their streams do not pair)"
        if after_probe is not None and a < after_probe:
            return f"blocks {a}-{e} start before the probe point {after_probe}"
        return None if store.has(("res", branch, a, e, 0)) else f"no cached residual for blocks {a}-{e}"
    if part.kind is ActionKind.ATTN:
        if after_probe:  # a prologue probe (0) runs before any block; a blocks probe ran some
            return "attention reuse cannot follow a blocks probe"
        if not info.attention_reusable:
            return "the model's blocks have no self-attention cut"
        if any(g >= info.num_blocks for g in part.attn_blocks):
            return f"attention block index out of range (model has {info.num_blocks} blocks)"
        missing = [g for g in part.attn_blocks if not store.has(("attn", branch, g, 0))]
        return f"no cached attention for blocks {missing}" if missing else None
    return None


class OnDemand(dict):
    """A mapping filled on first access (the attention a probe's decision asks for)."""

    def __init__(self, fetch: Any) -> None:
        super().__init__()
        self._fetch = fetch

    def __missing__(self, key: Any) -> Any:
        value = self[key] = self._fetch(key)
        return value
