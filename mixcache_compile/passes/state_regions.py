"""Keep each global-state region of the graph inside one stage.

Note [state regions]: Dynamo traces some context managers into the graph as a pair of calls
that set and restore interpreter state, with the nodes between them depending on that state
but not on the opening call's output. ``torch.func.vmap`` (flex attention's mask creation
uses it) becomes ``_vmap_increment_nesting`` ... ``_vmap_decrement_nesting``; ``autocast``
becomes ``_enter_autocast`` ... ``_exit_autocast``. The partitioner places nodes by module
stack and data flow, so the closing call (no module stack, no inputs, no users) can land in
another stage than the opening one, e.g. hoisted to the prologue: the stage that opens the
region then returns with the state still set, and the one that closes it fails
("!dynamicLayerStack.empty()"), or worse, a skipped block leaves the state unbalanced.

So every region (outermost pair, in graph order) is moved whole into the one block segment
its nodes touch. A region whose nodes belong to several blocks, or whose move would make a
stage read a value computed by a later stage, cannot be planned: ``PlanError`` names it and
the backend compiles the graph without caching.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx

from .partition import EPILOGUE, PROLOGUE, Segment


class StateRegionError(ValueError):
    """A state region cannot be kept inside one stage (the message says which and why)."""


def _target_name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", str(target)) if node.op == "call_function" else ""


# opening call name -> (closing call name, what the region is, to name it in errors)
_PAIRS: dict[str, tuple[str, str]] = {
    "_vmap_increment_nesting": ("_vmap_decrement_nesting", "torch.func.vmap"),
    "_enter_autocast": ("_exit_autocast", "autocast"),
}
_CLOSERS = {close: open_ for open_, (close, _) in _PAIRS.items()}


def state_regions(compute: list[fx.Node]) -> list[tuple[int, int, str]]:
    """Outermost (start, end, kind) index ranges of ``compute`` between an opening call and
    its closing call (matched last-in first-out per kind)."""
    stacks: dict[str, list[int]] = {}
    regions: list[tuple[int, int, str]] = []
    depth = 0
    for i, node in enumerate(compute):
        name = _target_name(node)
        if name in _PAIRS:
            stacks.setdefault(name, []).append(i)
            depth += 1
        elif name in _CLOSERS and stacks.get(_CLOSERS[name]):
            start = stacks[_CLOSERS[name]].pop()
            depth -= 1
            if depth == 0:
                regions.append((start, i, _PAIRS[_CLOSERS[name]][1]))
    return regions


def _rank(seg: Segment) -> tuple[Any, ...]:
    """Execution order of segments: prologue, then per chain its glue and its blocks, then epilogue."""
    if seg == PROLOGUE:
        return (0,)
    if seg == EPILOGUE:
        return (2,)
    return (1, seg.chain, -1 if seg.kind == "glue" else seg.index)


def keep_regions_whole(gm: fx.GraphModule, segments: dict[fx.Node, Segment]) -> int:
    """Move each state region into one block segment (Note [state regions]); returns how many
    regions were moved. Raises ``StateRegionError`` naming a region that cannot be kept whole."""
    compute = [n for n in gm.graph.nodes if n in segments]
    moved = 0
    for start, end, kind in state_regions(compute):
        region = compute[start : end + 1]
        segs = {segments[n] for n in region}
        if len(segs) == 1:
            continue
        blocks = {s for s in segs if s.kind == "block"}
        if len(blocks) != 1:
            names = ", ".join(sorted(s.name for s in segs))
            raise StateRegionError(f"a {kind} region ({region[0].name} .. {region[-1].name}) spans stages {names}")
        target = blocks.pop()
        _check_movable(region, target, segments, kind, _rank)
        for node in region:
            segments[node] = target
        moved += 1
    return moved


def _check_movable(region: list[fx.Node], target: Segment, segments: dict[fx.Node, Segment], kind: str,
                   rank: Callable[[Segment], tuple[Any, ...]]) -> None:
    inside = set(region)
    for node in region:
        for a in node.all_input_nodes:
            if a not in inside and a in segments and rank(segments[a]) > rank(target):
                raise StateRegionError(f"a {kind} region in {target.name} reads {a.name}, computed later")
        for u in node.users:
            if u not in inside and u in segments and rank(segments[u]) < rank(target):
                raise StateRegionError(f"a {kind} region moved into {target.name} feeds {u.name}, computed earlier")
