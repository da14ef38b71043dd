"""Split the prologue into the time modulation's ancestors and the rest (a prologue probe).

A prologue probe (TeaCache) watches the timestep modulation the prologue hands to the first
block. On a call the probe then decides to skip, only that value and its indicator are needed,
yet the prologue also patch-embeds the latents, embeds the text and builds the rotary tables:
on a small model that is a large share of a call's time though a small share of its FLOPs.
So the fused plan replaces the prologue unit by two units:

  * ``probe_head``: the nodes the modulation depends on (timestep -> sinusoid -> MLP ->
    projection), returning the modulation plus every value of theirs read later;
  * ``prologue``: every other prologue node, reading those values as inputs.

The probe's indicator variant is built on the head alone, and the rest of the prologue fuses
into the next group: TeaCache runs [head + indicator] [whole model] on a computing call and
[head + indicator] + reuse on a skipped one.

Note [split prologue computes the same]: every prologue node runs exactly once, in the head or
in the rest, on the same inputs, so the slots filled after both equal the prologue's outputs
bit for bit (eager) and the FLOPs of a computed call are unchanged. Values the head hands to the
rest that the prologue did not return get fresh slots numbered from ``first_free_slot``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .stage_graph import StageGraph, build_stage_graph


@dataclass(frozen=True)
class PrologueSplit:
    head: StageGraph  # the modulation's ancestors; outputs include the modulation slot
    rest: StageGraph  # the other prologue nodes
    num_slots: int  # slot count including the fresh slots of head -> rest values


def split_prologue(prologue: StageGraph, modulation_slot: int, first_free_slot: int) -> PrologueSplit | None:
    """The head/rest split of ``prologue`` around ``modulation_slot``; None if the split
    would not make the head smaller (then the whole prologue stays the probe's unit)."""
    gm = prologue.gm
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    returned: list[fx.Node] = list(output.args[0])
    if modulation_slot not in prologue.outputs:
        return None
    target = returned[prologue.outputs.index(modulation_slot)]
    if target.op == "placeholder":
        return None
    ancestors = _ancestors(target)
    compute = [n for n in nodes if n.op not in ("placeholder", "output")]
    head_nodes = [n for n in compute if n in ancestors]
    rest_nodes = [n for n in compute if n not in ancestors]
    if not rest_nodes:
        return None  # nothing to move out of the probe
    slot_of_returned = {n: s for n, s in zip(returned, prologue.outputs)}
    slot_of_input = dict(zip(placeholders, prologue.inputs))

    rest_set = set(rest_nodes)
    head_set = set(head_nodes)
    head_out: list[fx.Node] = [n for n in head_nodes if n in slot_of_returned or any(u in rest_set for u in n.users)]
    next_slot = first_free_slot
    slot_of: dict[fx.Node, int] = dict(slot_of_input)
    for n in head_out:
        if n in slot_of_returned:
            slot_of[n] = slot_of_returned[n]
        else:
            slot_of[n] = next_slot
            next_slot += 1
    head_in = [p for p in placeholders if p in ancestors]
    rest_in: list[fx.Node] = []
    for n in rest_nodes:
        for a in n.all_input_nodes:
            if (a.op == "placeholder" or a in head_set) and a not in rest_in:
                rest_in.append(a)
    rest_out = [n for n in returned if n in rest_set]
    if not rest_out or any(n.op == "placeholder" for n in returned):
        return None  # nothing left to move out, or an input returned as it is: keep the plain probe
    head = StageGraph(
        f"{prologue.name}.probe_head", build_stage_graph(gm, head_nodes, head_in, head_out),
        [slot_of[p] for p in head_in], [slot_of[n] for n in head_out],
    )
    rest = StageGraph(
        f"{prologue.name}.rest", build_stage_graph(gm, rest_nodes, rest_in, rest_out),
        [slot_of[n] for n in rest_in], [slot_of_returned[n] for n in rest_out],
    )
    return PrologueSplit(head, rest, next_slot)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen
