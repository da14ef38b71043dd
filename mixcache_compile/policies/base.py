"""``PolicyBase``: the policy protocol with every optional hook typed and given its default.

The runtime calls every hook on every policy; the defaults do what the runtime would do with
no policy opinion (continue in full after a probe, reuse cached values as they are, rebuild
the uncond output as ``cond + delta``). Policies derive from it and override what they need.
A policy object that does not derive from it (any object with ``name``, ``needs``,
``decide``, ``reset``) still works: ``hooks_of`` fills in the defaults of the hooks it lacks,
once, when a session takes the policy.
"""

from __future__ import annotations

from typing import Any

import torch

from .protocol import FULL, Action, CacheNeeds, CallReport, ModelInfo, Observation

_HOOKS = ("bind_model", "after_probe", "observe", "reuse_output", "reuse_attention", "rebuild_uncond")


class PolicyBase:
    """Required: ``name``, ``needs``, ``decide``, ``reset``; the rest are optional hooks."""

    name: str = "policy"

    def needs(self, model: ModelInfo) -> CacheNeeds:
        return CacheNeeds()

    def decide(self, obs: Observation) -> Action:
        return FULL

    def reset(self) -> None:
        pass

    # ---- optional hooks -----------------------------------------------------------------
    def bind_model(self, model: torch.nn.Module) -> None:
        """The model the session serves, once, before its first call (``enable`` and the
        backend form call it): a policy whose defaults depend on the weights (mixcache's
        calibration per model) picks them here. Default: nothing."""

    def after_probe(self, obs: Observation, indicator: float) -> Action:
        """The action after the probe (``CacheNeeds.probe``) measured ``indicator``."""
        return FULL

    def observe(self, report: CallReport) -> None:
        """What happened on the call (after it ran)."""

    def reuse_output(self, current: list[torch.Tensor], previous: list[torch.Tensor] | None, obs: Observation | None) -> list[torch.Tensor]:
        """The outputs a STEP call returns. ``current``: the last computed output (with
        ``history=2``; otherwise the last output); ``previous``: the one before (None until
        two exist, or with ``history=1``). Default: a copy of ``current``, so a caller that
        modifies what it is returned cannot corrupt the cache."""
        return [t.clone() for t in current]

    def reuse_attention(self, block: int, current: list[torch.Tensor], previous: list[torch.Tensor] | None, obs: Observation | None) -> list[torch.Tensor]:
        """The attention outputs block ``block`` is fed on an ATTN call (default: the cached ones)."""
        return current

    def rebuild_uncond(self, cond: torch.Tensor, delta: torch.Tensor, obs: Observation | None) -> torch.Tensor:
        """The uncond output rebuilt from the cond one and the CFG difference."""
        return cond + delta


class _Defaults(PolicyBase):
    """A policy object without ``PolicyBase``: its own hooks where it has them, defaults elsewhere."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.name = getattr(policy, "name", type(policy).__name__)
        for hook in _HOOKS:
            own = getattr(policy, hook, None)
            if own is not None:
                setattr(self, hook, own)

    def needs(self, model: ModelInfo) -> CacheNeeds:
        return self.policy.needs(model)

    def decide(self, obs: Observation) -> Action:
        return self.policy.decide(obs)

    def reset(self) -> None:
        self.policy.reset()


def hooks_of(policy: Any) -> PolicyBase:
    """``policy`` itself when it derives from ``PolicyBase``, else a view with the defaults."""
    return policy if isinstance(policy, PolicyBase) else _Defaults(policy)
