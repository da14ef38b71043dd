"""What the graph's inputs are: module state or user data, the timestep, the batch dimension.

Dynamo lifts parameters and buffers to placeholders (inline_inbuilt_nn_modules) named
``l_self_...``; everything else is user data. With a batch-symbolic trace Dynamo also passes
sizes as SymInt inputs: we map each to the (tensor input, dim) it is read from, so that a
half-batch call can recompute them from the sliced tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx


@dataclass
class InputInfo:
    user_tensors: list[int] = field(default_factory=list)
    timestep: int | None = None
    batch_inputs: list[int] = field(default_factory=list)  # user tensors whose dim 0 is the batch
    symint_sources: dict[int, tuple[int, int]] = field(default_factory=dict)  # placeholder -> (tensor, dim)
    batch_symbolic: bool = False

    def user_signature(self, args: Sequence[Any]) -> tuple:
        return tuple((tuple(args[i].shape), args[i].dtype) for i in self.user_tensors)

    def timestep_value(self, args: Sequence[Any]) -> float | None:
        if self.timestep is None:
            return None
        t = args[self.timestep]
        return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)

    def half_batch_args(self, args: Sequence[Any], part: int) -> list[Any]:
        """Arguments of one half of a batch-concatenated call (``part`` 0 or 1)."""
        out = list(args)
        for i in self.batch_inputs:
            half = args[i].shape[0] // 2
            out[i] = args[i][part * half:(part + 1) * half]
        for p, (t, d) in self.symint_sources.items():
            out[p] = out[t].shape[d]
        return out


def _is_state(node: fx.Node, example: Any) -> bool:
    return isinstance(example, torch.nn.Parameter) or node.name.startswith(("l_self_", "self_"))


def classify_inputs(placeholders: list[fx.Node], example_inputs: Sequence[Any]) -> InputInfo:
    info = InputInfo()
    fakes = {}
    for i, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(example, torch.Tensor) and not _is_state(node, example):
            info.user_tensors.append(i)
            fakes[i] = node.meta.get("example_value")
            if info.timestep is None and "timestep" in node.name:
                info.timestep = i
    _find_symint_sources(placeholders, fakes, info)
    _find_batch_inputs(fakes, info)
    return info


def _find_symint_sources(placeholders: list[fx.Node], fakes: dict[int, Any], info: InputInfo) -> None:
    for p, node in enumerate(placeholders):
        value = node.meta.get("example_value")
        if not isinstance(value, torch.SymInt):
            continue
        for t, fake in fakes.items():
            if not isinstance(fake, torch.Tensor):
                continue
            dims = [d for d, size in enumerate(fake.shape) if str(size) == str(value)]
            if dims:
                info.symint_sources[p] = (t, dims[0])
                break


def _find_batch_inputs(fakes: dict[int, Any], info: InputInfo) -> None:
    tensors = [(i, f) for i, f in fakes.items() if isinstance(f, torch.Tensor) and f.dim() > 0]
    if not tensors:
        return
    batch = tensors[0][1].shape[0]
    info.batch_symbolic = isinstance(batch, torch.SymInt)
    if info.batch_symbolic:
        info.batch_inputs = [i for i, f in tensors if str(f.shape[0]) == str(batch)]
