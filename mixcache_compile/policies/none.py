"""Policy ``none``: always compute everything. The reference every other policy is measured against."""

from __future__ import annotations

from .protocol import FULL, Action, CacheNeeds, ModelInfo, Observation


class NonePolicy:
    name = "none"

    def needs(self, model: ModelInfo) -> CacheNeeds:
        return CacheNeeds()

    def decide(self, obs: Observation) -> Action:
        return FULL

    def reset(self) -> None:
        pass
