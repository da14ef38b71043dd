"""Policy ``none``: always compute everything ("compile only"). The reference every other
policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config import PolicyConfig, expect_config
from .base import PolicyBase
from .protocol import FULL, Action, CacheNeeds, ModelInfo, Observation


@dataclass(frozen=True)
class NoneConfig(PolicyConfig):
    """No options: every call computes in full."""

    name: ClassVar[str] = "none"


class NonePolicy(PolicyBase):
    name = "none"

    def __init__(self, config: NoneConfig | None = None) -> None:
        self.config = expect_config(config, NoneConfig)

    def needs(self, model: ModelInfo) -> CacheNeeds:
        return CacheNeeds()

    def decide(self, obs: Observation) -> Action:
        return FULL

    def reset(self) -> None:
        pass
