"""Find the transformer block chain(s) of a Dynamo graph.

A chain is a module list (``blocks``, ``transformer_blocks``, ``single_transformer_blocks``...)
whose items run one after another in the graph. Candidates are confirmed by block class:
the model's ``_repeated_blocks`` where diffusers declares it, else any list with a run of at
least ``min_blocks`` same-class items. Models with two lists in sequence (Flux, HunyuanVideo:
dual-stream then single-stream) give two chains, in graph order.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx as fx

from .module_stack import indexed_frame, module_frames


@dataclass
class BlockChain:
    """One list of repeated blocks: its path, block class and member nodes per index."""

    list_path: str
    cls_name: str
    nodes: dict[int, list[fx.Node]] = field(default_factory=dict)

    @property
    def indices(self) -> list[int]:
        return sorted(self.nodes)

    def label(self, index: int) -> str:
        return f"{self.list_path}.{index}"


class NoBlocksFound(ValueError):
    """The graph holds no run of repeated blocks the passes can plan around."""


def _collect_candidates(gm: fx.GraphModule) -> dict[tuple[str, str], dict[int, list[fx.Node]]]:
    found: dict[tuple[str, str], dict[int, list[fx.Node]]] = defaultdict(lambda: defaultdict(list))
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        hit = indexed_frame(module_frames(node))
        if hit is not None:
            list_path, index, cls_name = hit
            found[(list_path, cls_name)][index].append(node)
    return found


def _is_contiguous(indices: list[int]) -> bool:
    return indices == list(range(indices[0], indices[0] + len(indices)))


def find_block_chains(
    gm: fx.GraphModule, repeated_blocks: list[str] | None = None, min_blocks: int = 2
) -> list[BlockChain]:
    """Chains of repeated blocks in graph order; raises ``NoBlocksFound`` with the reason."""
    candidates = _collect_candidates(gm)
    if not candidates:
        raise NoBlocksFound("no node sits inside an indexed sub-module (`<list>.<int>`)")
    chains = []
    for (list_path, cls_name), per_index in candidates.items():
        if repeated_blocks and cls_name not in repeated_blocks:
            continue
        indices = sorted(per_index)
        if len(indices) < min_blocks or not _is_contiguous(indices):
            continue
        chains.append(BlockChain(list_path, cls_name, dict(per_index)))
    if not chains:
        hint = f" of classes {repeated_blocks}" if repeated_blocks else ""
        raise NoBlocksFound(f"no list of at least {min_blocks} contiguous repeated blocks{hint}")
    # Nested lists (a block list inside each block) are not chains of their own.
    chains = [c for c in chains if not any(c.list_path.startswith(o.list_path + ".") for o in chains if o is not c)]
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    chains.sort(key=lambda c: order[c.nodes[c.indices[0]][0]])
    _check_sequential(chains, order)
    return chains


def _check_sequential(chains: list[BlockChain], order: dict[fx.Node, int]) -> None:
    """Blocks must run one after another: block k's nodes all precede block k+1's."""
    last_end = -1
    for chain in chains:
        for index in chain.indices:
            positions = [order[n] for n in chain.nodes[index]]
            if min(positions) <= last_end:
                raise NoBlocksFound(f"block {chain.label(index)} interleaves with the block before it")
            last_end = max(positions)
