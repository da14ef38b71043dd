"""Caching policies behind one protocol (``protocol.py``), built by name with ``make_policy``."""

from __future__ import annotations

import inspect
from typing import Any

from .none import NonePolicy
from .protocol import CFG, FULL, STEP, Action, ActionKind, CacheNeeds, ModelInfo, Observation, Policy
from .static import StaticPolicy

POLICIES: dict[str, type] = {"none": NonePolicy, "static": StaticPolicy}


def make_policy(policy: str | Policy, **options: Any) -> Policy:
    """A policy object from its name and options; unknown names or keys raise naming the valid ones."""
    if not isinstance(policy, str):
        if options:
            raise TypeError("policy options go with a policy name, not with a policy object")
        if not isinstance(policy, Policy):
            raise TypeError(f"{policy!r} does not implement the Policy protocol (name, needs, decide, reset)")
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[policy]
    valid = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for policy {policy!r}; valid options: {valid}")
    return cls(**options)


__all__ = [
    "Action", "ActionKind", "CacheNeeds", "ModelInfo", "Observation", "Policy",
    "FULL", "STEP", "CFG", "POLICIES", "make_policy",
]
