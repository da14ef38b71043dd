"""Caching policies behind one protocol (``protocol.py``), each configured by a typed, frozen
``PolicyConfig`` (``config.py``) and built with ``make_policy``.

The registry ``POLICIES`` maps a policy name to its config class and policy class. Entries
are imported on first use ("module:ConfigClass:PolicyClass"), so one policy's import never
breaks another's; ``register_policy`` adds a policy of your own.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from .config import PolicyConfig
from .none import NoneConfig, NonePolicy
from .protocol import CFG, FULL, PROBE, STEP, Action, ActionKind, CacheNeeds, CallReport, ModelInfo, Observation, Policy, Probe
from .static import StaticConfig, StaticPolicy

# Note [default policy]: what ``enable(pipe)``, ``CacheSession()`` and ``backend="mixcache"``
# run when no policy is given: the flagship, at its calibrated defaults (or its conservative
# fallback on a model without calibration). `"none"` stays available as "compile only".
# Changing the default is changing this one constant.
DEFAULT_POLICY = "mixcache"

PolicyEntry = tuple[type[PolicyConfig], type] | str

POLICIES: dict[str, PolicyEntry] = {
    "none": (NoneConfig, NonePolicy),
    "static": (StaticConfig, StaticPolicy),
    "fastercache": "fastercache:FasterCacheConfig:FasterCachePolicy",
    "mixcache": "mixcache:MixCacheConfig:MixCachePolicy",
    "fbcache": "fbcache:FbCacheConfig:FBCachePolicy",
    "dbcache": "fbcache:DbCacheConfig:DBCachePolicy",
    "teacache": "teacache:TeaCacheConfig:TeaCachePolicy",
    "pab": "pab:PabConfig:PABPolicy",
}


def policy_types(name: str) -> tuple[type[PolicyConfig], type]:
    """``(config class, policy class)`` of a registered policy; unknown or unimportable names
    raise ValueError naming the valid ones (or the import error)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}")
    entry = POLICIES[name]
    if isinstance(entry, str):
        module, config_name, policy_name = entry.split(":")
        try:
            loaded = importlib.import_module(f"{__name__}.{module}")
            entry = (getattr(loaded, config_name), getattr(loaded, policy_name))
        except (ImportError, AttributeError) as err:
            raise ValueError(f"policy {name!r} is not available in this build ({err})") from None
        POLICIES[name] = entry
    return entry


def config_class(name: str) -> type[PolicyConfig]:
    return policy_types(name)[0]


def policy_class(name: str) -> type:
    return policy_types(name)[1]


_policy_class = policy_class  # the name older callers (bench, tests) import


def register_policy(config_cls: type[PolicyConfig], policy_cls: type) -> None:
    """Make ``config_cls.name`` a policy name: ``make_policy(name, ...)`` and ``make_policy(config)``
    then build ``policy_cls(config)``."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, PolicyConfig) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"{config_cls!r} is not a PolicyConfig dataclass")
    if not config_cls.name:
        raise ValueError(f"{config_cls.__name__} needs a class attribute name: ClassVar[str]")
    POLICIES[config_cls.name] = (config_cls, policy_cls)


def make_config(policy: str | PolicyConfig = DEFAULT_POLICY, **options: Any) -> PolicyConfig:
    """The config of a policy: given as is, or built from a name and keyword options (the
    keyword shortcut; unknown names or keys raise naming the valid ones)."""
    if isinstance(policy, PolicyConfig):
        if options:
            raise TypeError(
                f"policy options go with a policy name, not with a {type(policy).__name__}; "
                "use dataclasses.replace(config, ...) to change a config"
            )
        config_class(policy.name)  # a config of an unregistered policy cannot be built into one
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"a policy is a name, a PolicyConfig or a Policy object, got {policy!r}")
    cls = config_class(policy)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for policy {policy!r}; valid options: {valid}")
    return cls(**options)


def make_policy(policy: str | PolicyConfig | Policy = DEFAULT_POLICY, **options: Any) -> Policy:
    """A policy object from a name and keyword options, from a config, or a policy object as is."""
    if not isinstance(policy, (str, PolicyConfig)):
        if options:
            raise TypeError("policy options go with a policy name, not with a policy object")
        if not isinstance(policy, Policy):
            raise TypeError(f"{policy!r} does not implement the Policy protocol (name, needs, decide, reset)")
        return policy
    config = make_config(policy, **options)
    config_cls, cls = policy_types(config.name)
    if not isinstance(config, config_cls):
        raise TypeError(f"{type(config).__name__} names policy {config.name!r}, whose config class is {config_cls.__name__}")
    return cls(config)


__all__ = [
    "Action", "ActionKind", "CacheNeeds", "ModelInfo", "Observation", "Policy", "PolicyConfig",
    "FULL", "STEP", "CFG", "PROBE", "Probe", "CallReport", "POLICIES", "DEFAULT_POLICY",
    "make_policy", "make_config", "policy_types", "config_class", "policy_class", "register_policy",
]
