"""Read block membership of FX nodes from Dynamo's ``nn_module_stack`` metadata.

Dynamo records, for every node it traces, the stack of modules it was inside as
``{key: (path, cls)}`` (outermost first). Paths look like
``L['self'].__dict__['_modules']['blocks'].1.attn1.to_q`` for diffusers models and
``L['self'].blocks.0`` for plain modules; torch's own ``_clean_stack_name`` drops the
index, which is exactly what we need, so we normalise here ourselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

_SELF_PREFIX = re.compile(r"^L\['self'\]\.?")
_MODULES_ITEM = re.compile(r"__dict__\['_modules'\]\['([^']+)'\]")
_DICT_ITEM = re.compile(r"\['([^']+)'\]")
_INDEX_ITEM = re.compile(r"\[(\d+)\]")


def normalise_path(raw: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].1.attn1`` -> ``blocks.1.attn1``."""
    path = _SELF_PREFIX.sub("", raw)
    path = _MODULES_ITEM.sub(r"\1", path)
    path = path.replace("_modules.", "")
    path = _DICT_ITEM.sub(r".\1", path)
    path = _INDEX_ITEM.sub(r".\1", path)
    parts = [p for p in path.split(".") if p and p != "__dict__"]
    return ".".join(parts)


@dataclass(frozen=True)
class ModuleFrame:
    """One entry of a node's module stack: normalised path and module class."""

    path: str
    cls_name: str


def module_frames(node: fx.Node) -> list[ModuleFrame]:
    """The node's module stack, outermost first, with normalised paths."""
    stack = node.meta.get("nn_module_stack") or {}
    frames = []
    for path, cls in stack.values():
        name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
        frames.append(ModuleFrame(normalise_path(path), name))
    return frames


def indexed_frame(frames: list[ModuleFrame]) -> tuple[str, int, str] | None:
    """First frame of the form ``<list path>.<int>``: (list path, index, class name)."""
    for frame in frames:
        head, _, tail = frame.path.rpartition(".")
        if head and tail.isdigit():
            return head, int(tail), frame.cls_name
    return None
