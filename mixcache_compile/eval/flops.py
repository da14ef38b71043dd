"""Counting a transformer's FLOPs per call, the same way for every method.

``torch.utils.flop_counter.FlopCounterMode`` also attributes FLOPs to modules: its
``ModuleTracker`` names every module that runs by walking ``named_children()`` depth first,
marking a module seen only after all its children. cache-dit's DBCache, during a forward,
puts a ``CachedBlocks`` module into ``transformer.blocks`` whose own child ``transformer`` is
that same transformer: a module cycle, so the walk recurses until ``RecursionError``. (That,
not hooks left by diffusers, is why DBCache failed under the frontier's counter.)

The frontier only needs the total, which does not depend on module names: ``GlobalFlopCounter``
is ``FlopCounterMode`` with a tracker that reports every op under "Global" and never walks
modules. Same op registry, same formulas, same totals; cycles do not matter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


class _GlobalOnlyTracker:
    """Stands in for ``ModuleTracker``: no module hooks, every op counted under "Global"."""

    parents = frozenset({"Global"})
    is_bw = False

    def __enter__(self) -> _GlobalOnlyTracker:
        return self

    def __exit__(self, *args: Any) -> None:
        return None


class GlobalFlopCounter(FlopCounterMode):
    """``FlopCounterMode(display=False)`` counting only the total (no per-module walk)."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _GlobalOnlyTracker()  # type: ignore[assignment]


class TransformerFlops:
    """FLOPs of every call of ``model`` (a ``GlobalFlopCounter`` entered around each call).

    ``calls`` counts the calls, so a test can compare the total with what those calls ran."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.total = 0
        self.calls = 0
        self._mode = GlobalFlopCounter()
        # always_call: a forward that raises (cache-dit's module cycle under FlopCounterMode's
        # tracker) must still leave the mode, or the dispatch mode stays pushed for the rest of
        # the process and every later torch.compile finds "no compiled frames".
        self._handles = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, module: Any, args: Any) -> None:
        self._mode.__enter__()

    def _exit(self, module: Any, args: Any, out: Any) -> None:
        self._mode.__exit__(None, None, None)
        self.total += self._mode.get_total_flops()
        self.calls += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
