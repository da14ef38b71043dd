"""The engine protocol: turn a stage graph into a callable, once per distinct graph and shape."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ..passes.stage_graph import StageGraph

StageFn = Callable[..., tuple[Any, ...]]


class Engine(Protocol):
    name: str

    def get(self, stage: StageGraph, args: Sequence[Any]) -> StageFn: ...


def signature(args: Sequence[Any]) -> tuple:
    """Shape/dtype signature of a stage call: one compiled artifact per signature."""
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((tuple(a.shape), a.dtype, a.device.type))
        else:
            sig.append(a)
    return tuple(sig)
