"""FLOPs of a stage call, counted once per stage graph and input signature.

Counting runs the eager stage graph on fake tensors under ``FlopCounterMode``: no real
compute, and independent of the engine that runs the stage for real.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ..passes.stage_graph import StageGraph


def count_flops(stage: StageGraph, args: Sequence[Any]) -> int:
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode, FlopCounterMode(display=False) as counter, torch.no_grad():
        stage.gm(*fakes)
    return int(counter.get_total_flops())
