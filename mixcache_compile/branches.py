"""The CFG branch vocabulary, in one table.

A policy and the runtime speak of three branches: ``"cond"``, ``"uncond"`` and ``"batch"``
(both branches in one batch-concatenated call; diffusers concatenates the uncond half first).
Pipelines name their denoiser calls through ``cache_context(name, ...)``; this table says
which branch each name means. Separate-branch pipelines (Wan, Flux true-CFG) say
``"cond"`` / ``"uncond"`` (some ``"positive"`` / ``"negative"``); pipelines that concatenate
both branches into one call (CogVideoX) say ``"cond_uncond"``, a call that carries both
branches only while the pipeline runs CFG (guidance scale > 1).
"""

from __future__ import annotations

from types import MappingProxyType

BRANCHES = ("cond", "uncond", "batch")

# cache_context name -> branch.
CONTEXT_BRANCHES = MappingProxyType({
    "cond": "cond",
    "uncond": "uncond",
    "positive": "cond",
    "negative": "uncond",
    "cond_uncond": "batch",
})

# Names whose call carries both branches (when CFG is on).
BATCHED_CONTEXT_NAMES = frozenset(n for n, b in CONTEXT_BRANCHES.items() if b == "batch")

# Names of one separate branch: the runtime's step tracker reads these (a batched name is
# decided by whether the pipeline runs CFG, not by the name alone).
SEPARATE_CONTEXT_BRANCHES = MappingProxyType({n: b for n, b in CONTEXT_BRANCHES.items() if b != "batch"})


def branch_of_name(name: str | None) -> str | None:
    """The branch a ``cache_context`` name means, or None for a name the table does not know."""
    return CONTEXT_BRANCHES.get(name) if name is not None else None
