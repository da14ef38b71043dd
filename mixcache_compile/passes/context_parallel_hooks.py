"""Move the nodes of diffusers' context-parallel hooks out of the blocks they are hooked on.

diffusers' context parallelism (``ModelMixin.enable_parallelism``) registers hooks on
sub-modules: ``ContextParallelSplitHook`` shards a block's inputs along the sequence in its
``pre_forward`` (Wan: ``hidden_states`` of ``blocks.0``), ``ContextParallelGatherHook``
gathers a module's output in its ``post_forward`` (Wan: ``proj_out``). Dynamo traces the
hook code inside the hooked module's call, so the split nodes carry ``blocks.0`` in their
module stack and would be planned as part of block 0.

Note [shard at the stage boundary]: a block stage must take and return the sequence in one
layout. If the split stays inside block 0, block 0 takes the full sequence and returns the
rank's shard: a residual over blocks ``[0, k)`` or a first-block probe
(``out - in``) would subtract a full-length tensor from a sharded one (the cache-dit /
vLLM-Omni bug). Clearing the module stack of every node traced from the hooks' code makes
them glue nodes, which the partition places by position: a split before the first block goes
to the prologue, a gather after the last block to the epilogue. Every block stage (and every
residual, attention output and probe value computed from block stages) is then shard-local.

Note [hooked module paths]: diffusers' ``HookRegistry`` replaces a hooked module's ``forward``
with a partial over ``new_forward``, so Dynamo reaches the children of a hooked module through
the hook: ``L['function_reference'].forward.__self__`` for the root and
``blocks.0.forward.func.__closure__[0].cell_contents.forward.__self__.attn1`` for a child of
a hooked block. Both name the same module as ``L['self']`` and ``blocks.0.attn1``; we rewrite
them so that the block's self-attention is found in block 0 as in every other block.
"""

from __future__ import annotations

import os
import re

import torch.fx as fx

# The file diffusers' context-parallel hooks live in; Dynamo records the user frames of each
# node in ``node.meta["stack_trace"]``.
_CP_HOOK_FILE = os.path.join("diffusers", "hooks", "context_parallel.py")
_HOOKED_ROOT = re.compile(r"^L\['function_reference'\]\.forward\.__self__")
_HOOKED_CHILD = re.compile(r"\.forward\.func\.__closure__\[\d+\]\.cell_contents\.forward\.__self__")


def unhook_path(raw: str) -> str:
    """A module path reached through diffusers' hook wrappers -> the plain path (Note [hooked module paths])."""
    return _HOOKED_CHILD.sub("", _HOOKED_ROOT.sub("L['self']", raw))


def is_context_parallel_hook_node(node: fx.Node) -> bool:
    """Whether ``node`` was traced from the code of diffusers' context-parallel hooks."""
    if node.op in ("placeholder", "output", "get_attr"):
        return False
    return _CP_HOOK_FILE in (node.meta.get("stack_trace") or "")


def detach_context_parallel_hooks(gm: fx.GraphModule) -> int:
    """Clear the module stack of the hook nodes (Note [shard at the stage boundary]) and
    un-hook the module paths of the others (Note [hooked module paths]).
    Returns how many nodes were detached (0 for a graph without context parallelism)."""
    count = 0
    for node in gm.graph.nodes:
        if is_context_parallel_hook_node(node):
            node.meta["nn_module_stack"] = {}
            count += 1
            continue
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {key: (unhook_path(path), cls) for key, (path, cls) in stack.items()}
    return count
