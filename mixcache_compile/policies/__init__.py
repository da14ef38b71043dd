"""Caching policies behind one protocol (``protocol.py``), built by name with ``make_policy``."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from .none import NonePolicy
from .protocol import CFG, FULL, PROBE, STEP, Action, ActionKind, CacheNeeds, CallReport, ModelInfo, Observation, Policy, Probe
from .static import StaticPolicy

POLICIES: dict[str, type | str] = {
    "none": NonePolicy,
    "static": StaticPolicy,
    # Imported on first use ("module:Class"), so one policy's import never breaks another's.
    "fastercache": "fastercache:FasterCachePolicy",
    "mixcache": "mixcache:MixCachePolicy",
    "fbcache": "fbcache:FBCachePolicy",
    "dbcache": "fbcache:DBCachePolicy",
    "teacache": "teacache:TeaCachePolicy",
    "pab": "pab:PABPolicy",
}


def _policy_class(name: str) -> type:
    entry = POLICIES[name]
    if isinstance(entry, str):
        import importlib

        module, _, cls = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"policy {name!r} is not available in this build ({err})") from None
    return entry


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
    cls = _policy_class(policy)
    config_class = getattr(cls, "config_class", None)  # a policy taking its options as a config dataclass
    if config_class is not None:
        valid = [f.name for f in dataclasses.fields(config_class)]
    else:
        valid = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for policy {policy!r}; valid options: {valid}")
    return cls(**options)


__all__ = [
    "Action", "ActionKind", "CacheNeeds", "ModelInfo", "Observation", "Policy",
    "FULL", "STEP", "CFG", "PROBE", "Probe", "CallReport", "POLICIES", "make_policy",
]
