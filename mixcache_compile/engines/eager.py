"""Engine ``eager``: run the stage GraphModules as they are (the reference for exactness)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..passes.stage_graph import StageGraph
from .base import StageFn


class EagerEngine:
    name = "eager"

    def __init__(self) -> None:
        self.compiles = 0  # eager never compiles; kept so engines report alike

    def get(self, stage: StageGraph, args: Sequence[Any]) -> StageFn:
        # The generated forward itself: nn.Module.__call__ (hooks, tracing checks) costs more
        # than a small stage's compute, and stage graphs carry no hooks.
        return stage.gm.forward
