"""Reading a transformer from the outside, for tools that hook an unmodified model
(sensitivity calibration, the error-budget fit): its main block list and the first tensor of
a module's output (a tensor, a tuple/list led by one, or a diffusers output's ``sample``)."""

from __future__ import annotations

from typing import Any

import torch

# Attribute names diffusers transformers give their main block list, most common first.
BLOCK_LISTS = ("transformer_blocks", "blocks", "double_blocks", "joint_blocks", "layers")


def find_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's main list of transformer blocks (the first chain)."""
    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            return blocks
    lists = [m for m in model.children() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks to calibrate")
    return max(lists, key=len)


def first_output(out: Any) -> torch.Tensor:
    """The leading tensor of a module's output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def replace_first_output(out: Any, value: torch.Tensor) -> Any:
    """``out`` with its leading tensor replaced by ``value`` (a diffusers output is changed in place)."""
    if isinstance(out, torch.Tensor):
        return value
    if isinstance(out, tuple):
        return (value, *out[1:])
    if isinstance(out, list):
        return [value, *out[1:]]
    out.sample = value
    return out
