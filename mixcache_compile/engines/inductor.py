"""Engine ``inductor``: compile each distinct stage graph once per input signature.

Blocks of one chain have identical canonical graphs (parameters are inputs), so they share
one compiled artifact: compile time does not grow with depth. Compilation is lazy (the first
call of a stage with a new signature), so variants a policy never uses are never compiled.

``mode`` and ``options`` are what a user gives ``torch.compile``: the mode's inductor settings
(``torch._inductor.list_mode_options``) with ``options`` on top become the config patches of
every stage compile, exactly as plain ``torch.compile(backend="inductor", ...)`` applies them
to its one graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..passes.stage_graph import StageGraph
from .base import StageFn, signature

log = logging.getLogger(__name__)


def inductor_patches(mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """Inductor config patches of a ``torch.compile`` mode plus explicit options; errors name
    an unknown mode or option (inductor's own messages)."""
    from torch._inductor import config, list_mode_options

    patches = dict(list_mode_options(mode) if mode and mode != "default" else {})
    if options:
        if not isinstance(options, dict):
            raise TypeError(f"inductor options must be a dict of inductor config names, got {type(options).__name__}")
        patches.update(options)
    if patches:
        unknown = [k for k in patches if k not in config._config]
        if unknown:
            raise ValueError(f"unknown inductor option(s) {unknown} (see torch._inductor.list_options())")
    return patches


class InductorEngine:
    name = "inductor"

    def __init__(self, mode: str | None = None, options: dict[str, Any] | None = None) -> None:
        self.mode = mode
        self.options = dict(options or {})
        self.config_patches = inductor_patches(mode, options)
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
            return compile_fx(gm, list(args), config_patches=self.config_patches or None)
