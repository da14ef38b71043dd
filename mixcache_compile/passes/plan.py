"""The planning pass: Dynamo graph -> stage plan (prologue | blocks | glue | epilogue).

One public function, ``plan_stages``. It runs three phases: find the block chains
(``find_blocks``), assign every node to a segment (``partition``), then cut each segment
into a canonical stage graph (``stage_graph``) and derive the variants the runtime needs:
"range reused" (stream slots paired across a block so a residual can stand in for a range)
and "attention reused" (a block variant taking its self-attention output as an input); probe
(indicator) variants are made by the plan when first asked (``StagePlan.probe_variant``).
The half-batch variant needs no graph of its own: a batch-symbolic stage runs at half
batch as it is, and engines specialise per input shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .attention_cut import attention_outputs, attention_scope, self_attention_path
from .find_blocks import BlockChain, NoBlocksFound, find_block_chains
from .indicator import with_residual_indicator, with_value_indicator
from .partition import EPILOGUE, PROLOGUE, Segment, assign_segments
from .state_regions import StateRegionError, keep_regions_whole
from .stage_graph import StageGraph, build_stage_graph, mutated_inputs


class PlanError(NoBlocksFound):
    """The graph cannot be planned; the message says why."""


@dataclass
class BlockStage:
    """A block's full stage plus what the runtime needs to skip it or reuse its attention."""

    chain: int
    index: int
    label: str
    stage: StageGraph  # outputs: stage outputs, then attention outputs (``attn_out``)
    stream_in: list[int] = field(default_factory=list)
    stream_map: list[tuple[int, int]] = field(default_factory=list)  # (stream index, output slot)
    stream_shapes_in: list[str] = field(default_factory=list)
    stream_shapes_out: dict[int, str] = field(default_factory=dict)
    attn_out: list[int] = field(default_factory=list)
    attn_reused: StageGraph | None = None  # inputs: ``attn_reused.inputs`` + cached attention outputs
    outputs_only_to_next: bool = True


@dataclass
class StagePlan:
    """Everything the runtime needs to run the graph stage by stage."""

    num_slots: int
    placeholders: list[fx.Node]
    output_spec: list[int | object]  # slot id, or a constant kept as it is
    output_is_slot: list[bool]
    prologue: StageGraph
    chains: list[list[BlockStage]]
    glue: dict[int, StageGraph]  # chain index -> stage run before that chain
    epilogue: StageGraph
    chain_names: list[str]
    range_reusable: list[bool]
    modulation_slot: int | None = None  # prologue output fed to block 0 that the timestep drives
    # Probe (indicator) variants by (kind, blocks): built from the graphs on first ask
    # (``probe_variant``), or given (an export manifest's plan has no graphs to build from).
    probe_variants: dict[tuple[str, int], StageGraph] = field(default_factory=dict)

    def blocks(self) -> list[BlockStage]:
        return [b for chain in self.chains for b in chain]

    def probe_refusal(self, kind: str, blocks: int) -> str | None:
        """Why a probe of ``kind`` (after ``blocks`` blocks) cannot run on this plan, or None."""
        if kind == "prologue":
            return None if self.modulation_slot is not None else "no timestep-driven prologue output to watch"
        first_chain = len(self.chains[0]) if self.chains else 0
        if not (1 <= blocks <= first_chain - 1):
            return f"probe over {blocks} first blocks needs 1 <= blocks < {first_chain} (first chain)"
        last = self.blocks()[blocks - 1]
        return None if any(j == 0 for j, _ in last.stream_map) else "the first blocks' hidden stream does not pair"

    def probe_slot(self, kind: str, blocks: int) -> int:
        """The slot the probe watches: the modulation input, or the hidden stream after the
        first ``blocks`` blocks (whose residual against ``hidden_in`` it compares)."""
        return self.modulation_slot if kind == "prologue" else dict(self.blocks()[blocks - 1].stream_map)[0]  # type: ignore[return-value]

    @property
    def hidden_in(self) -> int:
        """The hidden stream's slot entering the first block (a blocks probe's residual base)."""
        return self.blocks()[0].stream_in[0]

    def probe_variant(self, kind: str, blocks: int) -> StageGraph:
        """The stage a probe runs: the prologue, or block ``blocks - 1``, also computing the
        indicator (``passes/indicator.py``). Inputs: the stage's, then (blocks probe) the
        hidden input and the previous residual, or (prologue probe) the previous value."""
        key = (kind, blocks)
        if key not in self.probe_variants:
            base = self.prologue if kind == "prologue" else self.blocks()[blocks - 1].stage
            if base.gm is None:
                raise PlanError(f"no probe variant {base.name}.probe in this plan (it has no graphs to build one from)")
            out = base.outputs.index(self.probe_slot(kind, blocks))
            gm = with_value_indicator(base.gm, out) if kind == "prologue" else with_residual_indicator(base.gm, out)
            self.probe_variants[key] = StageGraph(f"{base.name}.probe", gm, list(base.inputs), list(base.outputs))
        return self.probe_variants[key]


def plan_stages(gm: fx.GraphModule, repeated_blocks: list[str] | None = None) -> StagePlan:
    """Cut ``gm`` into stage graphs; raises ``PlanError`` naming why it cannot."""
    try:
        chains = find_block_chains(gm, repeated_blocks)
    except NoBlocksFound as err:
        raise PlanError(str(err)) from None
    segments = assign_segments(gm, chains)
    try:
        keep_regions_whole(gm, segments)  # Note [state regions] in state_regions.py
    except StateRegionError as err:
        raise PlanError(f"cannot keep a global-state region inside one stage: {err}") from None
    slot = {n: i for i, n in enumerate(gm.graph.nodes)}
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    by_segment: dict[Segment, list[fx.Node]] = {}
    for node, seg in segments.items():
        by_segment.setdefault(seg, []).append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for nodes in by_segment.values():
        nodes.sort(key=order.__getitem__)

    def io_of(nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
        inside = set(nodes)
        inputs: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        return inputs, outputs

    def make_stage(name: str, nodes: list[fx.Node], extra_out: list[fx.Node] = ()) -> StageGraph:
        inputs, outputs = io_of(nodes)
        outputs = outputs + [n for n in extra_out if n not in outputs]
        sgm = build_stage_graph(gm, nodes, inputs, outputs)
        bad = mutated_inputs(sgm)
        if bad:
            raise PlanError(f"stage {name} writes its inputs in place ({', '.join(bad)})")
        return StageGraph(name, sgm, [slot[n] for n in inputs], [slot[n] for n in outputs])

    prologue = make_stage("prologue", by_segment.get(PROLOGUE, []))
    epilogue = make_stage("epilogue", by_segment.get(EPILOGUE, []))
    glue = {
        seg.chain: make_stage(seg.name, nodes) for seg, nodes in by_segment.items() if seg.kind == "glue"
    }
    planned_chains, reusable = [], []
    for c, chain in enumerate(chains):
        blocks, ok = _plan_chain(gm, c, chain, by_segment, io_of, make_stage, slot)
        planned_chains.append(blocks)
        reusable.append(ok)
    modulation = _modulation_slot(gm, prologue, planned_chains, slot)
    out_args = output_node.args[0]
    flat = list(out_args) if isinstance(out_args, (tuple, list)) else [out_args]
    return StagePlan(
        num_slots=len(slot),
        placeholders=[n for n in gm.graph.nodes if n.op == "placeholder"],
        output_spec=[slot[a] if isinstance(a, fx.Node) else a for a in flat],
        output_is_slot=[isinstance(a, fx.Node) for a in flat],
        prologue=prologue,
        chains=planned_chains,
        glue=glue,
        epilogue=epilogue,
        chain_names=[c.list_path for c in chains],
        range_reusable=reusable,
        modulation_slot=modulation,
    )


def _modulation_slot(gm: fx.GraphModule, prologue: StageGraph, chains: list[list[BlockStage]], slot) -> int | None:
    """The first tensor the prologue hands to block 0, other than its streams, that depends on
    a ``timestep`` input: the time-modulation signal TeaCache-style indicators watch."""
    if not chains or not chains[0]:
        return None
    nodes = list(gm.graph.nodes)
    driven: set[fx.Node] = {n for n in nodes if n.op == "placeholder" and "timestep" in n.name}
    for node in nodes:
        if node.op != "placeholder" and any(a in driven for a in node.all_input_nodes):
            driven.add(node)
    block0 = chains[0][0]
    produced = set(prologue.outputs)
    for s in block0.stage.inputs:
        node = nodes[s]
        value = node.meta.get("example_value")
        if s in produced and s not in block0.stream_in and node in driven and isinstance(value, torch.Tensor) and value.is_floating_point():
            return s
    return None


def _plan_chain(gm, c, chain: BlockChain, by_segment, io_of, make_stage, slot) -> tuple[list[BlockStage], bool]:
    blocks: list[BlockStage] = []
    nodes_of = {k: by_segment[Segment("block", c, k)] for k in chain.indices}
    for k in chain.indices:
        nodes = nodes_of[k]
        attn_path = self_attention_path(chain.label(k), nodes)
        attn_outs = attention_outputs(attention_scope(nodes, attn_path)) if attn_path else []
        stage = make_stage(f"block.{c}.{k}", nodes, attn_outs)
        block = BlockStage(c, k, chain.label(k), stage, attn_out=[slot[n] for n in attn_outs])
        if attn_outs:
            block.attn_reused = _attention_reused_variant(gm, block, nodes, attn_path, attn_outs, io_of, slot)
        blocks.append(block)
    reusable = _pair_streams(chain, blocks, nodes_of, io_of, slot)
    return blocks, reusable


def _attention_reused_variant(gm, block, nodes, attn_path, attn_outs, io_of, slot) -> StageGraph:
    scope = set(attention_scope(nodes, attn_path))
    kept = [n for n in nodes if n not in scope]
    inputs, outputs = io_of(nodes)
    replaced = {n: j for j, n in enumerate(attn_outs)}
    sgm = build_stage_graph(gm, kept + list(attn_outs), inputs, outputs, replaced)
    sgm.graph.eliminate_dead_code()
    used_inputs = []
    for node, src in zip([n for n in sgm.graph.nodes if n.op == "placeholder"], inputs + list(attn_outs)):
        if node.name.startswith("cached_"):
            continue
        if node.users:
            used_inputs.append(src)
        else:
            sgm.graph.erase_node(node)
    sgm.recompile()
    return StageGraph(f"{block.stage.name}.attn_reused", sgm, [slot[n] for n in used_inputs], [slot[n] for n in outputs])


def _pair_streams(chain: BlockChain, blocks: list[BlockStage], nodes_of, io_of, slot) -> bool:
    """Fill each block's ``stream_in`` and ``stream_map`` (stream index -> output slot), so
    that a block range can be replaced by its input streams plus a cached residual.

    Stream inputs of a block are the values it takes from stages before it that no other
    block of the chain reads (hidden and encoder streams; shared inputs such as the time
    embedding or rotary tables are read by every block). Their order is the order of first
    use inside the block, the same for structurally equal blocks. An interior block's outputs
    are indexed by where the next block takes them in; the last block's by matching shapes
    with its own stream inputs (it may drop a stream: Flux and HunyuanVideo discard the
    encoder stream after their last block). Returns whether every block pairs.
    """
    all_block_nodes = {k: set(v) for k, v in nodes_of.items()}
    stream_ins: dict[int, list[fx.Node]] = {}
    for k in chain.indices:
        inputs, _ = io_of(nodes_of[k])
        others = set().union(*(all_block_nodes[j] for j in chain.indices if j != k))
        stream_ins[k] = [v for v in inputs if v.op != "placeholder" and not any(u in others for u in v.users)]
    ok = True
    for pos, block in enumerate(blocks):
        k = block.index
        _, outs = io_of(nodes_of[k])
        block.stream_in = [slot[v] for v in stream_ins[k]]
        if pos + 1 < len(blocks):
            nxt = stream_ins[blocks[pos + 1].index]
            pairs = {j: v for j, v in enumerate(nxt) if v in outs}
            complete = len(pairs) == len(nxt)
        else:
            pairs = _pair_by_shape(stream_ins[k], outs)
            complete = bool(pairs)
        block.stream_map = sorted((j, slot[v]) for j, v in pairs.items()) if complete else []
        block.stream_shapes_in = [_meta_key(v) for v in stream_ins[k]]
        block.stream_shapes_out = {j: _meta_key(v) for j, v in pairs.items()}
        block.outputs_only_to_next = complete and set(outs) == set(pairs.values())
        ok = ok and bool(block.stream_map)
    return ok


def _pair_by_shape(inputs: list[fx.Node], outputs: list[fx.Node]) -> dict[int, fx.Node]:
    """Pair each output with the one stream input of the same shape and dtype; {} if any is ambiguous."""
    pairs: dict[int, fx.Node] = {}
    for out in outputs:
        matches = [j for j, v in enumerate(inputs) if _meta_key(v) == _meta_key(out)]
        if len(matches) != 1 or matches[0] in pairs:
            return {}
        pairs[matches[0]] = out
    return pairs


def _meta_key(node: fx.Node) -> str:
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor):
        return f"?{node.name}"
    return f"{tuple(value.shape)}:{value.dtype}"


def range_ok(blocks: list[BlockStage], start: int, stop: int) -> bool:
    """Whether global blocks [start, stop) of one chain can be replaced by a residual."""
    if not (0 <= start < stop <= len(blocks)):
        return False
    first, last = blocks[start], blocks[stop - 1]
    if any(b.chain != first.chain for b in blocks[start:stop]) or not last.stream_map:
        return False
    if not all(b.outputs_only_to_next for b in blocks[start:stop]):
        return False
    return all(j < len(first.stream_shapes_in) and first.stream_shapes_in[j] == shape for j, shape in last.stream_shapes_out.items())
