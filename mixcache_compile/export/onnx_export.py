"""Stage graph -> ONNX: bake module state in as initializers, export with the dynamo exporter.

A stage graph takes every tensor it reads as an input, parameters included (Dynamo lifts them
to placeholders). For an exported engine the parameters belong inside the model: each one is
turned into a ``get_attr`` of a registered buffer, so ``torch.onnx.export(..., dynamo=True)``
writes it as an initializer, not a graph input (COMPILE.md, "Export"). Python scalars among
the inputs (SymInt batch sizes of a batch-symbolic trace) are baked in as constants: every
exported file is one static specialisation, and the manifest records which.

Note [one export per structural key]: blocks of a chain print the same canonical code, so
their stage graphs share a structural key. The dynamo export runs once per key and input
signature; the other blocks get a copy of the ONNX graph with their own parameter tensors put
into the initializers named after the parameter's input position (``param_<i>``). Export runs
with ``optimize=False`` so no initializer is derived from (folded with) a parameter; onnxruntime
folds constants itself when it loads the model. ``verify`` checks every file against the eager
stage anyway.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

PARAM_PREFIX = "param_"


class ExportError(RuntimeError):
    """Export cannot honour a request or a graph; the message says what and why."""


@dataclass
class StageIO:
    """How one stage call maps onto an exported file.

    ``kinds[i]`` for stage input ``i``: "data" (an ONNX input ``in_<i>``), "param" (baked as an
    initializer) or "const" (a Python value baked in, recorded in ``consts``). Outputs that are
    not tensors are constants too (``out_consts``); the tensor outputs are ``out_<j>``.
    """

    kinds: list[str]
    consts: dict[int, Any]
    out_tensor: list[bool]
    out_consts: dict[int, Any]

    @property
    def input_names(self) -> list[str]:
        return [f"in_{i}" for i, k in enumerate(self.kinds) if k == "data"]

    @property
    def output_names(self) -> list[str]:
        return [f"out_{j}" for j, t in enumerate(self.out_tensor) if t]


def describe_io(args: Sequence[Any], is_param: Sequence[bool], outputs: Sequence[Any]) -> StageIO:
    kinds, consts = [], {}
    for i, (a, p) in enumerate(zip(args, is_param)):
        if isinstance(a, torch.Tensor):
            kinds.append("param" if p else "data")
        elif a is None or isinstance(a, (bool, int, float, torch.SymInt)):
            kinds.append("const")
            consts[i] = int(a) if isinstance(a, torch.SymInt) else a
        else:
            raise ExportError(f"stage input {i} is a {type(a).__name__}; only tensors and Python scalars can be exported")
    out_tensor, out_consts = [], {}
    for j, o in enumerate(outputs):
        if isinstance(o, torch.Tensor):
            out_tensor.append(True)
        elif o is None or isinstance(o, (bool, int, float, torch.SymInt)):
            out_tensor.append(False)
            out_consts[j] = int(o) if isinstance(o, torch.SymInt) else o
        else:
            raise ExportError(f"stage output {j} is a {type(o).__name__}; only tensors and Python scalars can be exported")
    return StageIO(kinds, consts, out_tensor, out_consts)


def bake_stage(gm: fx.GraphModule, args: Sequence[Any], io: StageIO, keep_params: bool = False) -> fx.GraphModule:
    """A copy of ``gm`` whose only placeholders are the "data" inputs: parameters become
    buffers ``param_<i>`` read by ``get_attr`` (unless ``keep_params``: then they stay
    inputs), constants are substituted, and only tensor outputs are returned."""
    graph = copy.deepcopy(gm.graph)
    root = torch.nn.Module()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(io.kinds):
        raise ExportError(f"stage has {len(placeholders)} inputs but {len(io.kinds)} arguments were given")
    first = next((n for n in graph.nodes if n.op != "placeholder"), None)
    for i, (node, kind) in enumerate(zip(placeholders, io.kinds)):
        if kind == "param" and not keep_params:
            name = f"{PARAM_PREFIX}{i}"
            root.register_buffer(name, args[i].detach())
            with graph.inserting_before(first):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
        elif kind == "const":
            value = io.consts[i]
            for user in list(node.users):
                user.args = fx.map_arg(user.args, lambda a, n=node, v=value: v if a is n else a)
                user.kwargs = fx.map_arg(user.kwargs, lambda a, n=node, v=value: v if a is n else a)
            graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    outs = list(output.args[0])
    output.args = (tuple(o for o, t in zip(outs, io.out_tensor) if t),)
    graph.eliminate_dead_code()
    baked = fx.GraphModule(root, graph)
    baked.recompile()
    return baked


def graph_key(gm: fx.GraphModule, args: Sequence[Any], io: StageIO, keep_params: bool = False) -> str:
    """Key of the exported graph: the baked code plus the shapes/dtypes of every tensor it
    takes (data and parameters). Unlike the structural key it sees concrete shapes, so blocks
    of a batch-symbolic trace (whose symbols differ per block) share one export too."""
    import hashlib

    baked = bake_stage(gm, args, io, keep_params)
    metas = [f"{k}:{tuple(a.shape)}:{a.dtype}" for a, k in zip(args, io.kinds) if k != "const"]
    return hashlib.sha1((baked.code + "|" + ";".join(metas)).encode()).hexdigest()[:16]


def data_args(args: Sequence[Any], io: StageIO, kinds: tuple[str, ...] = ("data",)) -> list[torch.Tensor]:
    """The tensors fed to the exported graph, none aliasing another: tracing would merge two
    inputs that are one tensor (block 0's probe gets its own hidden input twice) into one."""
    out, seen = [], set()
    for a, k in zip(args, io.kinds):
        if k in kinds:
            a = a.detach()
            if a.untyped_storage().data_ptr() in seen:
                a = a.clone()
            seen.add(a.untyped_storage().data_ptr())
            out.append(a)
    return out


def export_onnx(gm: fx.GraphModule, args: Sequence[Any], io: StageIO, opset: int | None = None):
    """Dynamo-export the baked stage; returns the in-memory ``onnx.ModelProto``."""
    baked = bake_stage(gm, args, io)
    inputs = tuple(data_args(args, io))
    options = dict(input_names=io.input_names, output_names=io.output_names, optimize=False, verbose=False)
    try:
        with torch.no_grad():
            fast = _cached_registry_export()
            if fast is not None:
                program = fast(baked, inputs, opset=opset, **options)
            else:
                kwargs = {"opset_version": opset} if opset is not None else {}
                program = torch.onnx.export(baked, inputs, dynamo=True, external_data=False, **options, **kwargs)
    except Exception as err:  # the exporter's own errors are long; keep the first line in ours
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"torch.onnx.export failed on a stage graph: {first}") from err
    return program.model_proto


_REGISTRIES: dict[int, Any] = {}


def _cached_registry_export():
    """``torch.onnx.export(..., dynamo=True)`` builds the torchlib registry (~2 s) on every
    call; a model has a handful of distinct stage graphs per signature, so we run the same
    exporter core with the registry built once per opset. Falls back to the public call if
    torch's internal layout differs."""
    try:
        from torch.onnx._internal.exporter import _constants, _core, _registration
    except ImportError:
        return None
    if not (hasattr(_core, "export") and hasattr(_registration.ONNXRegistry, "from_torchlib")):
        return None

    def run(model, inputs, *, opset, **options):
        version = max(opset or _constants.TORCHLIB_OPSET, _constants.TORCHLIB_OPSET)
        if version not in _REGISTRIES:
            _REGISTRIES[version] = _registration.ONNXRegistry().from_torchlib(opset_version=version)
        return _core.export(model, inputs, registry=_REGISTRIES[version], opset_version=opset or version, **options)

    return run


def with_params(model, args: Sequence[Any], io: StageIO):
    """A copy of ``model`` whose ``param_<i>`` initializers hold ``args[i]`` (Note [one export
    per structural key])."""
    from onnx import numpy_helper

    new = copy.deepcopy(model)
    for init in new.graph.initializer:
        if init.name.startswith(PARAM_PREFIX):
            i = int(init.name[len(PARAM_PREFIX):])
            init.CopyFrom(numpy_helper.from_array(_to_numpy(args[i]), init.name))
    return new


def _to_numpy(t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        raise ExportError("bfloat16 parameters cannot be written by this exporter; export in float32 or float16")
    return t.numpy()


# ---- writing files ---------------------------------------------------------------------------
class WeightFile:
    """``weights.bin`` beside the ONNX files: every initializer of at least ``threshold`` bytes
    is stored once, addressed by content, and the ONNX files reference it as external data.
    A block's full stage, its attention-reused variant and its probe variant (and each input
    signature's copy) all read the same bytes, so nothing is on disk twice."""

    ALIGN = 64

    def __init__(self, directory, name: str = "weights.bin", threshold: int = 1024) -> None:
        from pathlib import Path

        self.name = name
        self.path = Path(directory) / name
        self.threshold = threshold
        self._index: dict[str, tuple[int, int]] = {}
        self._file = open(self.path, "wb")
        self.size = 0

    def externalize(self, model) -> None:
        import hashlib

        from onnx import TensorProto, numpy_helper
        from onnx.external_data_helper import set_external_data

        for init in model.graph.initializer:
            data = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
            if len(data) < self.threshold:
                continue
            digest = hashlib.sha1(data).hexdigest()
            if digest not in self._index:
                pad = (-self.size) % self.ALIGN
                self._file.write(b"\0" * pad)
                self._index[digest] = (self.size + pad, len(data))
                self._file.write(data)
                self.size += pad + len(data)
            offset, length = self._index[digest]
            if not init.HasField("raw_data"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
            set_external_data(init, self.name, offset=offset, length=length)
            init.data_location = TensorProto.EXTERNAL
            init.ClearField("raw_data")

    def close(self) -> None:
        self._file.close()

    @property
    def unique_tensors(self) -> int:
        return len(self._index)
