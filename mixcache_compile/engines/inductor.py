"""Engine ``inductor``: compile each distinct stage graph once per input signature.

Blocks of one chain have identical canonical graphs (parameters are inputs), so they share
one compiled artifact: compile time does not grow with depth. Compilation is lazy (the first
call of a stage with a new signature), so variants a policy never uses are never compiled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..passes.stage_graph import StageGraph
from .base import StageFn, signature

log = logging.getLogger(__name__)


class InductorEngine:
    name = "inductor"

    def __init__(self, mode: str | None = None) -> None:
        self.mode = mode
        self.compiles = 0
        self._compiled: dict[tuple, StageFn] = {}

    def get(self, stage: StageGraph, args: Sequence[Any]) -> StageFn:
        key = (stage.key, signature(args))
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compile(stage, args)
            self._compiled[key] = fn
        return fn

    def _compile(self, stage: StageGraph, args: Sequence[Any]) -> StageFn:
        from torch._inductor.compile_fx import compile_fx

        log.debug("inductor: compiling %s (key %s)", stage.name, stage.key)
        self.compiles += 1
        # Compile a fresh copy so no inductor pass can touch the graph other stages share.
        gm = torch.fx.GraphModule(stage.gm, stage.gm.graph.__deepcopy__({}))
        with torch.no_grad():
            return compile_fx(gm, list(args))
