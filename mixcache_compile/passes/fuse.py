"""Stage fusion by need: merge adjacent stages that the session's policy never runs apart.

The planner cuts the graph at every block boundary so that any action can run. A given policy
uses only a few of those cuts: ``none`` none at all, first-block cache one after its probe
blocks and one on each side of the range it skips, TeaCache one after the prologue, a static
schedule the ones its scheduled ranges and attention blocks touch. Every cut costs a stage
call (Python, an engine call wrapper, values materialised for the next stage) and stops the
compiler from fusing kernels across it, so this pass rebuilds the stage list with only the
cuts a policy's ``CacheNeeds`` require.

The stage sequence ("units") is prologue, then per chain its glue stage (if any) and its
blocks, then the epilogue. A cut ``k`` separates unit ``k - 1`` from unit ``k``. Groups are
the runs between cuts; a group of one unit is that unit's own ``StageGraph`` (so its compiled
artifact is shared with the unfused plan and with structurally equal blocks), a longer group
is a new graph that inlines its units' graphs in order (``fuse_stages``).

Note [fusion keeps values]: a fused group returns every value it produces that a unit outside
the group reads, or that the graph returns, and nothing else; values read only inside the
group (a block's attention output kept for recording, the hidden state between two fused
blocks) stay internal. The runtime only ever reads slots at cuts the needs declared, so it
never looks for an internal value (``FusedPlan.covers`` checks that per action).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from .indicator import with_residual_indicator, with_value_indicator
from .plan import StagePlan
from .probe_split import split_prologue
from .stage_graph import StageGraph

# Pseudo slots (negative: never a real slot) of a probe variant's extra inputs and outputs.
PROBE_PREV = -1  # input: the stored previous value the indicator compares against
PROBE_RESIDUAL = -2  # output: the probe blocks' hidden-stream residual (kind "blocks")
PROBE_INDICATOR = -3  # output: [mean|a - b|, mean|b| + eps]


@dataclass(frozen=True)
class Unit:
    """One stage of the unfused sequence. ``block`` is the global block index, or None."""

    kind: str  # "probe_head" | "prologue" | "glue" | "block" | "epilogue"
    stage: StageGraph
    block: int | None = None


@dataclass(frozen=True)
class ProbePoint:
    """Where a policy's probe sits: ``kind`` "prologue", or "blocks" after ``blocks`` blocks."""

    kind: str
    blocks: int = 1


@dataclass
class Group:
    """A run of units between two cuts, and the stage that computes it."""

    start: int  # first unit index
    stop: int  # one past the last unit index
    stage: StageGraph
    first_block: int | None  # global index of the block the group starts with, if it does
    last_block: int | None  # global index of the block the group ends with, if it does
    probe_stage: StageGraph | None = None  # the group with the probe's indicator, if it ends at the probe


@dataclass
class FusedPlan:
    """The groups for one set of needs, and which cuts they keep."""

    units: list[Unit]
    cuts: frozenset[int]
    groups: list[Group]
    block_unit: list[int]  # global block index -> unit index
    ranges: frozenset[tuple[int, int]]  # ranges whose residual this plan records
    attn_blocks: frozenset[int]
    probe: ProbePoint | None
    num_slots: int  # the plan's slots plus those of values a split prologue passes on

    @property
    def num_stages(self) -> int:
        return len(self.groups)

    def covers(self, ranges: Iterable[tuple[int, int]] = (), attn_blocks: Iterable[int] = (), probe: ProbePoint | None = None) -> bool:
        """Whether every cut these need is kept (else the runtime runs the unfused plan)."""
        return required_cuts(self.block_unit, ranges, attn_blocks, probe) <= self.cuts


def stage_units(plan: StagePlan) -> list[Unit]:
    """The unfused stage sequence, in execution order."""
    units = [Unit("prologue", plan.prologue)]
    g = 0
    for c, chain in enumerate(plan.chains):
        if c in plan.glue:
            units.append(Unit("glue", plan.glue[c]))
        for block in chain:
            units.append(Unit("block", block.stage, g))
            g += 1
    units.append(Unit("epilogue", plan.epilogue))
    return units


def required_cuts(
    block_unit: Sequence[int], ranges: Iterable[tuple[int, int]], attn_blocks: Iterable[int], probe: ProbePoint | None
) -> frozenset[int]:
    """The cuts the runtime needs to skip/record ``ranges``, swap the attention of
    ``attn_blocks`` and read the probe's value."""
    cuts: set[int] = set()
    for a, e in ranges:
        cuts.add(block_unit[a])  # the range's input streams are read here
        cuts.add(block_unit[e - 1] + 1)  # and its output streams written here
    for g in attn_blocks:  # a block that may run as its attention-reused variant stands alone
        cuts.update((block_unit[g], block_unit[g] + 1))
    if probe is not None:
        cuts.add(1 if probe.kind == "prologue" else block_unit[probe.blocks - 1] + 1)
    return frozenset(cuts)


def fuse_plan(
    plan: StagePlan,
    ranges: Iterable[tuple[int, int]] = (),
    attn_blocks: Iterable[int] = (),
    probe: ProbePoint | None = None,
) -> FusedPlan:
    """Group the plan's stages with only the cuts the given needs require."""
    units, num_slots = stage_units(plan), plan.num_slots
    if probe is not None and probe.kind == "prologue" and plan.modulation_slot is not None:
        # Note [split prologue computes the same]: the probe unit is only the modulation's
        # ancestors; the rest of the prologue joins the next group.
        split = split_prologue(plan.prologue, plan.modulation_slot, plan.num_slots)
        if split is not None:
            units = [Unit("probe_head", split.head), Unit("prologue", split.rest), *units[1:]]
            num_slots = split.num_slots
    block_unit = [i for i, u in enumerate(units) if u.kind == "block"]
    ranges, attn_blocks = frozenset(ranges), frozenset(attn_blocks)
    cuts = required_cuts(block_unit, ranges, attn_blocks, probe)
    bounds = [0, *sorted(cuts), len(units)]
    readers = _readers(units, plan)
    groups = []
    for start, stop in zip(bounds, bounds[1:]):
        members = units[start:stop]
        if len(members) == 1:
            stage = members[0].stage
        else:
            stage = fuse_stages(_group_name(members), [u.stage for u in members], _kept(members, stop, readers))
        groups.append(
            Group(start, stop, stage, members[0].block, members[-1].block)
        )
    if probe is not None:
        _attach_probe(plan, units, groups, block_unit, probe)
    return FusedPlan(units, cuts, groups, block_unit, ranges, attn_blocks, probe, num_slots)


def _group_name(members: list[Unit]) -> str:
    return f"fused[{members[0].stage.name}..{members[-1].stage.name}]"


def _readers(units: list[Unit], plan: StagePlan) -> dict[int, int]:
    """Slot -> index of the last unit that reads it (``len(units)`` for graph outputs)."""
    last: dict[int, int] = {}
    for i, unit in enumerate(units):
        for slot in unit.stage.inputs:
            last[slot] = i
    for slot, is_slot in zip(plan.output_spec, plan.output_is_slot):
        if is_slot:
            last[slot] = len(units)
    return last


def _kept(members: list[Unit], stop: int, readers: dict[int, int]) -> list[int]:
    """Note [fusion keeps values]: outputs of the group read after it (stages are in order,
    so "read by a later unit" is "last reader at or after ``stop``")."""
    kept: list[int] = []
    for unit in members:
        kept.extend(s for s in unit.stage.outputs if readers.get(s, -1) >= stop and s not in kept)
    return kept


def _attach_probe(plan: StagePlan, units: list[Unit], groups: list[Group], block_unit: list[int], probe: ProbePoint) -> None:
    """Give the group that ends at the probe point a variant that also computes the indicator."""
    if probe.kind == "prologue":
        if plan.modulation_slot is None:
            return
        end_unit = 0
        base = units[0].stage
        gm = with_value_indicator(base.gm, base.outputs.index(plan.modulation_slot))
        last = StageGraph(f"{base.name}.probe", gm, [*base.inputs, PROBE_PREV], [*base.outputs, PROBE_INDICATOR])
        extra = [PROBE_INDICATOR]
    else:
        block = plan.blocks()[probe.blocks - 1]
        hidden = dict(block.stream_map).get(0)
        if hidden is None:
            return
        end_unit = block_unit[probe.blocks - 1]
        base = units[end_unit].stage
        gm = with_residual_indicator(base.gm, base.outputs.index(hidden))
        h_in = plan.blocks()[0].stream_in[0]
        last = StageGraph(
            f"{base.name}.probe", gm, [*base.inputs, h_in, PROBE_PREV], [*base.outputs, PROBE_RESIDUAL, PROBE_INDICATOR]
        )
        extra = [PROBE_RESIDUAL, PROBE_INDICATOR]
    group = next(g for g in groups if g.stop == end_unit + 1)
    members = units[group.start:group.stop]
    stages = [u.stage for u in members[:-1]] + [last]
    # The variant returns what the plain group returns (a lone block: its attention outputs too).
    kept = list(group.stage.outputs)
    group.probe_stage = fuse_stages(f"{_group_name(members)}.probe", stages, kept, extra)


def fuse_stages(name: str, stages: Sequence[StageGraph], kept: Sequence[int], extra_outputs: Sequence[int] = ()) -> StageGraph:
    """One stage computing ``stages`` in order, wired through their slots.

    Its inputs are the slots the stages read that none of them produced earlier, in
    ascending slot order (graph inputs first, in placeholder order: a group that starts at
    the prologue takes the call's arguments as they are). Its outputs are ``kept`` then
    ``extra_outputs`` (pseudo slots such as ``PROBE_INDICATOR``).
    """
    produced: set[int] = set()
    inputs: list[int] = []
    for stage in stages:
        inputs.extend(s for s in stage.inputs if s not in produced and s not in inputs)
        produced.update(stage.outputs)
    inputs.sort()
    graph = fx.Graph()
    value: dict[int, fx.Node] = {}
    metas = _input_metas(stages)
    for i, slot in enumerate(inputs):
        value[slot] = graph.placeholder(f"in_{i}")
        value[slot].meta = dict(metas[slot])
    root = torch.nn.Module()
    for k, stage in enumerate(stages):
        _inline(graph, root, stage, value, prefix=f"s{k}_")
    missing = [s for s in [*kept, *extra_outputs] if s not in value]
    if missing:
        raise ValueError(f"fused stage {name}: outputs {missing} are not produced by its stages")
    graph.output(tuple(value[s] for s in [*kept, *extra_outputs]))
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    return StageGraph(name, gm, inputs, [*kept, *extra_outputs])


def _input_metas(stages: Sequence[StageGraph]) -> dict[int, dict]:
    metas: dict[int, dict] = {}
    for stage in stages:
        placeholders = [n for n in stage.gm.graph.nodes if n.op == "placeholder"]
        for node, slot in zip(placeholders, stage.inputs):
            metas.setdefault(slot, node.meta)
    return metas


def _inline(graph: fx.Graph, root: torch.nn.Module, stage: StageGraph, value: dict[int, fx.Node], prefix: str) -> None:
    """Copy ``stage``'s nodes into ``graph``; its placeholders read ``value[slot]`` and its
    outputs are recorded back into ``value``. ``get_attr`` targets move under ``prefix``."""
    local: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in stage.gm.graph.nodes if n.op == "placeholder"]
    for node, slot in zip(placeholders, stage.inputs):
        local[node] = value[slot]
    for node in stage.gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            for slot, out in zip(stage.outputs, node.args[0]):
                value[slot] = local[out]
            continue
        if node.op == "get_attr":
            target = prefix + node.target.replace(".", "_")
            _register(root, target, _fetch(stage.gm, node.target))
            new = graph.get_attr(target)
            new.meta = dict(node.meta)
        else:
            new = graph.node_copy(node, lambda a: local[a])
        local[node] = new


def _fetch(gm: torch.nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _register(root: torch.nn.Module, name: str, obj: object) -> None:
    if isinstance(obj, torch.nn.Parameter):
        root.register_parameter(name, obj)
    elif isinstance(obj, torch.Tensor):
        root.register_buffer(name, obj)
    elif isinstance(obj, torch.nn.Module):
        root.add_module(name, obj)
    else:
        setattr(root, name, obj)
