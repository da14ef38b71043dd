"""What the sweep's config modules share: the spec type and seeded input makers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SweepSpec:
    """Constructor kwargs and a function of a seed giving one call's keyword arguments.

    ``marks``: pytest marks for the class's sweep case (e.g. ``slow`` where Dynamo's trace of
    the class takes long even at tiny dims). ``with_model``: ``inputs`` takes the built model as
    a second argument (for inputs only the model can make, such as a class's own RoPE tables).
    ``flops_unknown``: for a class whose stage FLOPs cannot be counted, a phrase every
    ``stats()["flops_unknown"]`` note must contain (the known reason); empty: all are counted.
    """

    config: dict[str, Any]
    inputs: Callable[..., dict[str, Any]]
    marks: tuple[str, ...] = field(default=())
    with_model: bool = False
    flops_unknown: str = ""


def r(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def t(seed: int) -> torch.Tensor:
    """A timestep in [0, 1000] that differs per seed (the sweep calls at two)."""
    return torch.tensor([900.0 - 100 * seed])
