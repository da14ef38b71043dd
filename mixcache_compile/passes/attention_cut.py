"""Locate each block's self-attention output, the cut point for attention reuse.

The self-attention module of a block is its first child whose class name ends in
"Attention" (``attn1`` in Wan/CogVideoX, ``attn`` in Flux/HunyuanVideo). Its outputs are the
nodes inside that module's scope that are read outside it (one for single-stream blocks,
two for joint attention that returns the hidden and the encoder stream).
"""

from __future__ import annotations

import torch.fx as fx

from .module_stack import module_frames


def self_attention_path(block_path: str, nodes: list[fx.Node]) -> str | None:
    """Path of the block's first attention child, e.g. ``blocks.3.attn1``."""
    prefix = block_path + "."
    for node in nodes:
        for frame in module_frames(node):
            if not frame.path.startswith(prefix):
                continue
            child = frame.path[len(prefix):].split(".")[0]
            if frame.path == prefix + child and frame.cls_name.endswith("Attention"):
                return frame.path
    return None


def attention_scope(nodes: list[fx.Node], attn_path: str) -> list[fx.Node]:
    """Nodes of the block that run inside the attention module."""
    return [n for n in nodes if any(f.path == attn_path for f in module_frames(n))]


def attention_outputs(scope: list[fx.Node]) -> list[fx.Node]:
    """Scope nodes read by nodes outside the scope, in graph order."""
    inside = set(scope)
    return [n for n in scope if any(user not in inside for user in n.users)]
