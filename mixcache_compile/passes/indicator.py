"""Indicator variants: a stage that also returns a relative-L1 change, computed in the graph.

Adaptive policies (first-block cache, TeaCache) decide from one scalar per call. Computing it
as an extra output of the stage that produces the tensor (instead of a separate pass over the
tensors on the host) keeps it fused into the compiled stage; the runtime fetches it once.

  residual probe: extra inputs (h_in, prev); extra outputs (r = out[i] - h_in, rel_l1(r, prev))
  value probe:    extra input  (prev);       extra outputs (rel_l1(out[i], prev))
with rel_l1(a, b) = mean|a - b| / (mean|b| + eps), returned as the pair
[mean|a - b|, mean|b| + eps] so the runtime can sum both over ranks before dividing
(Note [rank-consistent decisions] in runtime/distributed.py).
"""

from __future__ import annotations

import torch
import torch.fx as fx

EPS = 1e-12


def _rel_l1(graph: fx.Graph, a: fx.Node, b: fx.Node) -> fx.Node:
    diff = graph.call_function(torch.sub, (a, b))
    num = graph.call_function(torch.mean, (graph.call_function(torch.abs, (diff,)),))
    den = graph.call_function(torch.mean, (graph.call_function(torch.abs, (b,)),))
    return graph.call_function(torch.stack, ([num, graph.call_function(torch.add, (den, EPS))],))


def _copy_with_extra_inputs(gm: fx.GraphModule, names: list[str]) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
    new = fx.GraphModule(gm, gm.graph.__deepcopy__({}))
    graph = new.graph
    output = next(n for n in graph.nodes if n.op == "output")
    last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
    extra = []
    with graph.inserting_after(last_ph):
        for name in reversed(names):
            extra.insert(0, graph.placeholder(name))
    return new, extra, list(output.args[0])


def with_residual_indicator(gm: fx.GraphModule, out_index: int) -> fx.GraphModule:
    """Variant of ``gm`` taking (h_in, prev_residual) last and also returning (residual, indicator)."""
    new, (h_in, prev), outs = _copy_with_extra_inputs(gm, ["probe_h_in", "probe_prev"])
    graph = new.graph
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        residual = graph.call_function(torch.sub, (outs[out_index], h_in))
        indicator = _rel_l1(graph, residual, prev)
    output.args = (tuple(outs) + (residual, indicator),)
    new.recompile()
    return new


def with_value_indicator(gm: fx.GraphModule, out_index: int) -> fx.GraphModule:
    """Variant of ``gm`` taking ``prev`` last and also returning rel_l1(out[out_index], prev)."""
    new, (prev,), outs = _copy_with_extra_inputs(gm, ["probe_prev"])
    graph = new.graph
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        indicator = _rel_l1(graph, outs[out_index], prev)
    output.args = (tuple(outs) + (indicator,),)
    new.recompile()
    return new
