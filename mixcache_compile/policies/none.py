"""Policy ``none``: always compute everything ("compile only"). The reference every other
policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config import PolicyConfig, expect_config
from .base import PolicyBase


@dataclass(frozen=True)
class NoneConfig(PolicyConfig):
    """No options: every call computes in full."""

    name: ClassVar[str] = "none"


class NonePolicy(PolicyBase):
    """Needs nothing, decides FULL, keeps no state: ``PolicyBase``'s defaults are exactly that."""

    name = "none"

    def __init__(self, config: NoneConfig | None = None) -> None:
        self.config = expect_config(config, NoneConfig)
