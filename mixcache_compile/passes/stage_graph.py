"""The stage graph type and the canonical copy that builds it.

A stage is a pure function: its inputs are value slots of the whole graph (graph inputs or
outputs of earlier stages), its outputs are new value slots. Stage graphs are rebuilt with
positional names (``in_0``, ``n0``...) so that blocks of identical structure print the same
code: the structural key below then lets an engine compile one graph for all of them.
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

# In-place call_function targets that would mutate a stage input (Note [pure stages]).
_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


@dataclass
class StageGraph:
    """One compiled unit. ``inputs``/``outputs`` are slot ids in the runtime's value table."""

    name: str
    gm: fx.GraphModule
    inputs: list[int]
    outputs: list[int]
    key: str = ""
    flops_hint: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.key:
            self.key = structural_key(self.gm)


def _value_meta(node: fx.Node) -> str:
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}{value.dtype}{value.stride() if not value.is_contiguous() else ''}"
    return type(value).__name__


def structural_key(gm: fx.GraphModule) -> str:
    """Hash of the canonical code plus input shapes/dtypes: equal keys -> one compile."""
    metas = [_value_meta(n) for n in gm.graph.nodes if n.op == "placeholder"]
    attrs = sorted(k for k in gm.state_dict()) if any(n.op == "get_attr" for n in gm.graph.nodes) else []
    payload = gm.code + "|" + ";".join(metas) + "|" + ";".join(attrs)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def build_stage_graph(
    source: fx.GraphModule,
    nodes: list[fx.Node],
    input_nodes: list[fx.Node],
    output_nodes: list[fx.Node],
    replaced: dict[fx.Node, int] | None = None,
) -> fx.GraphModule:
    """Copy ``nodes`` into a new graph whose placeholders are ``input_nodes`` (in order) and
    which returns ``output_nodes`` as a tuple. ``replaced`` maps inner nodes to extra
    placeholder positions appended after the inputs (used to feed cached tensors in)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(input_nodes):
        env[node] = graph.placeholder(f"in_{i}")
        env[node].meta = dict(node.meta)
    extra = sorted((replaced or {}).items(), key=lambda kv: kv[1])
    for j, (node, _) in enumerate(extra):
        env[node] = graph.placeholder(f"cached_{j}")
        env[node].meta = dict(node.meta)
    attrs: dict[str, object] = {}
    for j, node in enumerate(nodes):
        if node in env:
            continue
        args = fx.map_arg(node.args, lambda a: env[a])
        kwargs = fx.map_arg(node.kwargs, lambda a: env[a])
        new = graph.create_node(node.op, node.target, args, kwargs, name=f"n{j}")
        new.meta = dict(node.meta)
        if node.op == "get_attr":
            attrs[node.target] = _fetch_attr(source, node.target)
        env[node] = new
    graph.output(tuple(env[n] for n in output_nodes))
    root = torch.nn.Module()
    for target, value in attrs.items():
        _set_attr(root, target, value)
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm


def _fetch_attr(gm: fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(root: torch.nn.Module, target: str, value: object) -> None:
    *path, last = target.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if isinstance(value, torch.nn.Parameter):
        mod.register_parameter(last, value)
    elif isinstance(value, torch.Tensor):
        mod.register_buffer(last, value)
    else:
        setattr(mod, last, value)


def mutated_inputs(gm: fx.GraphModule) -> list[str]:
    """Placeholders written in place inside the stage (Note [pure stages]).

    Note [pure stages]: the runtime keeps references to stage inputs (a block range's input
    is needed again to form its residual) and engines may hold a stage as a CUDA graph or an
    exported engine, so no stage may write to a tensor it did not create.
    """
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    hits = []
    for node in gm.graph.nodes:
        first = node.args[0] if node.args else None
        if first not in placeholders:
            continue
        inplace_method = node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")
        inplace_fn = node.op == "call_function" and node.target in _INPLACE_FUNCTIONS
        if inplace_method or inplace_fn:
            hits.append(f"{first.name} by {node.target}")
    return hits
