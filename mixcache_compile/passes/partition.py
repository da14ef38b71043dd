"""Assign every compute node of the graph to a segment: prologue, block, glue, epilogue.

Block nodes are known from their module stack. Glue nodes (no stack, or a module outside
the chains) are placed by position: before the first block -> prologue, after the last ->
epilogue, between two chains -> a glue segment, between two blocks of one chain -> the
following block. A glue node between blocks that depends on no block output is hoisted
to the prologue instead, so that skipping a block range never skips a value a later stage
still needs (Note [hoisting]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .find_blocks import BlockChain


@dataclass(frozen=True)
class Segment:
    """Where a node runs. ``chain``/``index`` are set for blocks, ``chain`` for glue."""

    kind: str  # "prologue" | "block" | "glue" | "epilogue"
    chain: int | None = None
    index: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "block":
            return f"block.{self.chain}.{self.index}"
        if self.kind == "glue":
            return f"glue.{self.chain}"
        return self.kind


PROLOGUE = Segment("prologue")
EPILOGUE = Segment("epilogue")


def _block_segments(chains: list[BlockChain]) -> dict[fx.Node, Segment]:
    owner: dict[fx.Node, Segment] = {}
    for c, chain in enumerate(chains):
        for index, nodes in chain.nodes.items():
            for node in nodes:
                owner[node] = Segment("block", c, index)
    return owner


def _depends_on(node: fx.Node, produced_by_blocks: set[fx.Node]) -> bool:
    return any(arg in produced_by_blocks for arg in node.all_input_nodes)


def assign_segments(gm: fx.GraphModule, chains: list[BlockChain]) -> dict[fx.Node, Segment]:
    """Segment of every non-placeholder, non-output node, in a valid execution order."""
    owner = _block_segments(chains)
    compute = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    block_positions = [i for i, n in enumerate(compute) if n in owner]
    first, last = block_positions[0], block_positions[-1]
    # Note [hoisting]: a node is "block-dependent" if any block output flows into it.
    block_dependent: set[fx.Node] = set(owner)
    next_block: Segment | None = None
    pending: list[fx.Node] = []
    result: dict[fx.Node, Segment] = {}
    for pos, node in enumerate(compute):
        if node in owner:
            next_block = owner[node]
            for glue in pending:
                result[glue] = _glue_segment(glue, prev_seg, next_block, block_dependent)
            pending = []
            result[node] = owner[node]
            prev_seg = owner[node]
            continue
        if pos < first:
            result[node] = PROLOGUE
        elif pos > last:
            result[node] = EPILOGUE
        else:
            pending.append(node)
            if _depends_on(node, block_dependent):
                block_dependent.add(node)
    return result


def _glue_segment(node: fx.Node, before: Segment, after: Segment, block_dependent: set[fx.Node]) -> Segment:
    if node not in block_dependent:
        return PROLOGUE
    if before.chain != after.chain:
        return Segment("glue", after.chain)
    return after
