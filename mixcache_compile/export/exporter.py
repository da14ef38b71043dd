"""``export``: a model or pipeline -> a directory of stage files plus ``manifest.json``.

Phases: capture (trace through the backend, keep the plan and the example calls), walk
(run every stage and variant once per exported input signature on the eager graphs, keeping
their arguments, outputs and FLOPs), write (ONNX files or saved inductor artifacts, one
export/compile per structural key and signature), verify (every file against the eager
stage), and the manifest with the SHA-256 of every file. Everything is written into a staging
directory beside the target and moved into place at the end (staging.py, Note [atomic export]).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..passes.stage_graph import StageGraph
from ..policies import DEFAULT_POLICY, PolicyConfig, make_config
from ..policies.fingerprint import fingerprint
from ..progress import progress
from ..runtime.executor import probe_value
from ..runtime.flops import count_flops
from .capture import Capture, capture
from .compat import running_versions
from .integrity import record_files
from .manifest import (
    FORMATS, Manifest, ManifestError, StageEntry, StageFile, dtype_name, plan_to_json, policy_to_json, tensor_meta,
)
from .onnx_export import ExportError, StageIO, WeightFile, describe_io, export_onnx, graph_key, with_params
from .staging import staging

log = logging.getLogger(__name__)

VARIANTS = ("attn_reused", "probe")


@dataclass
class StageCall:
    """One stage (or variant) run at one signature during the walk."""

    stage: StageGraph
    role: str
    args: list[Any]
    outputs: tuple
    is_param: list[bool]
    extra_inputs: list[str] = field(default_factory=list)
    extra_outputs: list[str] = field(default_factory=list)
    probe: dict | None = None


@dataclass
class ExportReport:
    """What ``export`` did: the manifest, and counts for the curious (or for tests)."""

    directory: Path
    manifest: Manifest
    graphs_exported: int  # dynamo exports / inductor compiles (one per structural key and signature)
    files: int
    seconds: float
    max_verify_error: float | None


def export(
    obj: Any,
    call_kwargs: dict[str, Any],
    out_dir: str | Path,
    *,
    format: str = "onnx",
    policy: str | PolicyConfig = DEFAULT_POLICY,
    cfg: str = "auto",
    branch_order: tuple[str, str] = ("cond", "uncond"),
    batch_order: tuple[str, str] = ("uncond", "cond"),
    variants: Sequence[str] = VARIANTS,
    dynamic_shapes: Any = None,
    verify: bool = True,
    atol: float = 1e-4,
    opset: int | None = None,
    **policy_options: Any,
) -> ExportReport:
    """Export every stage and variant of ``obj`` (a diffusers pipeline or a transformer) as
    traced on ``obj(**call_kwargs)`` into ``out_dir``.

    ``format``: "onnx" (one ONNX file per stage instance and input signature, parameters as
    initializers in a shared ``weights.bin``) or "inductor" (saved inductor artifacts, one per
    structural key and signature, parameters in ``params.safetensors``). ``policy`` and its
    options (or a ``PolicyConfig``; default ``DEFAULT_POLICY``, what ``enable`` runs), ``cfg``,
    ``branch_order`` and ``batch_order`` are recorded as the runtime's defaults, and the traced
    model's weights fingerprint with them (the loaded transformer binds the policy to it).
    Every export is a static specialisation: the input shapes of the example calls
    (and, for a batch-concatenated CFG graph, the half batch its CFG reuse runs). Refuses,
    naming why, what it cannot honour: other formats, ``dynamic_shapes``, graphs with symbolic
    dimensions other than that batch, policy objects or options JSON cannot record.
    """
    start = time.perf_counter()
    policy_config = _check_request(format, dynamic_shapes, policy, policy_options, variants)
    out = Path(out_dir)
    with staging(out) as tmp:  # Note [atomic export]: nothing appears at ``out`` until every file is written
        manifest, writer, max_err = _write_export(
            obj, call_kwargs, tmp, format=format, policy_config=policy_config, cfg=cfg, branch_order=branch_order,
            batch_order=batch_order, variants=variants, verify=verify, atol=atol, opset=opset,
        )
    return ExportReport(out, manifest, writer.graphs, writer.files, time.perf_counter() - start, max_err)


def _write_export(obj: Any, call_kwargs: dict[str, Any], out: Path, *, format: str, policy_config: PolicyConfig,
                  cfg: str, branch_order: tuple[str, str], batch_order: tuple[str, str], variants: Sequence[str],
                  verify: bool, atol: float, opset: int | None) -> tuple[Manifest, Any, float | None]:
    """Capture, walk, write every file into ``out`` (the staging directory), record the
    SHA-256 of each and write the manifest last."""
    cap = capture(obj, call_kwargs, cfg)
    runner = cap.runner
    _check_static(cap)
    signatures = _signatures(cap)
    entries: dict[str, StageEntry] = {}
    calls_by_sig: dict[str, list[StageCall]] = {}
    for sig_id, (args, half_of) in signatures.items():
        # A half-batch call (batched CFG reuse) never probes, but a composite CFG action may reuse
        # attention on the cond half (Note [action table]): its attention variant is exported too.
        calls_by_sig[sig_id] = _walk(runner, args, set(variants) if half_of is None else set(variants) - {"probe"})
    writer = _OnnxWriter(out, opset) if format == "onnx" else _InductorWriter(out)
    max_err: float | None = 0.0 if verify else None
    sig_json: dict[str, dict] = {}
    flops_of: dict[str, int] = {}
    bar = progress(desc=f"export ({format})", total=sum(len(c) for c in calls_by_sig.values()), unit="stage")
    for sig_id, calls in calls_by_sig.items():
        args, half_of = signatures[sig_id]
        full = 0
        for call in calls:
            bar.update()
            bar.set_postfix_str(call.stage.name[:40])
            entry = entries.get(call.stage.name)
            if entry is None:
                entry = entries[call.stage.name] = StageEntry(
                    call.stage.name, call.role, call.stage.key, list(call.stage.inputs), list(call.stage.outputs),
                    call.extra_inputs, call.extra_outputs, call.probe,
                )
            io = describe_io(call.args, call.is_param, call.outputs)
            file = writer.write(call, io, sig_id)
            if writer.last_key not in flops_of:  # one graph, one count (it depends on shapes only)
                flops_of[writer.last_key] = count_flops(call.stage, call.args)
            flops = flops_of[writer.last_key]
            if call.role in ("prologue", "glue", "block", "epilogue"):
                full += flops
            entry.files[sig_id] = StageFile(
                file=file, kinds=io.kinds, consts=io.consts,
                data_meta=[tensor_meta(a) for a, k in zip(call.args, io.kinds) if k == "data"],
                out_tensor=io.out_tensor, out_consts=io.out_consts,
                out_meta=[tensor_meta(o) for o in call.outputs if isinstance(o, torch.Tensor)], flops=flops,
                graph=writer.last_key,
            )
            if verify:
                max_err = max(max_err, writer.verify(file, call, io, atol))
        sig_json[sig_id] = {"user": [tensor_meta(args[i]) for i in runner.inputs.user_tensors], "full_flops": full, "half_of": half_of}
    bar.close()
    writer.finish()
    manifest = Manifest(
        format=format,
        model=_model_json(cap),
        call=_call_json(cap),
        inputs=_inputs_json(runner),
        plan=plan_to_json(runner.plan),
        stages=entries,
        signatures=sig_json,
        policy=policy_to_json(policy_config),
        session={"cfg": cfg, "branch_order": list(branch_order), "batch_order": list(batch_order),
                 "batched_context": any(c.batched for c in cap.calls)},
        weights=writer.weights_json(),
        created_with=running_versions(),
    )
    manifest.files = record_files(out, manifest.named_files() | writer.extra_files())
    manifest.save(out)
    return manifest, writer, max_err


# ---- checks ------------------------------------------------------------------------------------
def _check_request(format: str, dynamic_shapes: Any, policy: Any, options: dict, variants: Sequence[str]) -> PolicyConfig:
    if format not in FORMATS:
        hint = " (TensorRT engines are built from an ONNX export: mixcache_compile.export.tensorrt.build_engines)" if format == "tensorrt" else ""
        raise ExportError(f"unknown export format {format!r}; valid formats: {', '.join(FORMATS)}{hint}")
    if dynamic_shapes:
        raise ExportError(
            "export writes static specialisations only and cannot honour dynamic_shapes="
            f"{dynamic_shapes!r}: every file is exported at the example call's shapes (plus the half batch of "
            "batch-concatenated CFG); export each resolution to its own directory"
        )
    if not isinstance(policy, (str, PolicyConfig)):
        raise ExportError("give the policy by name (and options as keywords) or as a PolicyConfig: a policy object cannot be written to the manifest")
    config = make_config(policy, **options)  # unknown names / options / bad values raise here, naming the valid ones
    try:
        policy_to_json(config)
    except ManifestError as err:
        raise ExportError(str(err)) from None
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ExportError(f"unknown variant kind(s) {unknown}; valid: {', '.join(VARIANTS)}")
    return config


def _check_static(cap: Capture) -> None:
    """Only the batch dimension of a batch-concatenated CFG graph may be symbolic (it is
    specialised to the full and the half batch); anything else symbolic is refused."""
    runner = cap.runner
    info = runner.inputs
    for i, node in enumerate(runner.plan.placeholders):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt):
            if i not in info.symint_sources:
                raise ExportError(f"graph input {node.name} is a symbolic size export cannot tie to a tensor dimension; only static graphs can be exported")
            t, d = info.symint_sources[i]
            if d != 0 or t not in info.batch_inputs:
                raise ExportError(f"graph input {node.name} is symbolic dimension {d} of input {t}: export supports static shapes "
                                  "(only the batch of batch-concatenated CFG may be symbolic); do not mark other dimensions dynamic")
        elif isinstance(value, torch.Tensor):
            for d, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and not (d == 0 and info.batch_symbolic and i in info.batch_inputs):
                    raise ExportError(f"graph input {node.name} has symbolic dimension {d} ({size}): export supports static shapes "
                                      "(only the batch of batch-concatenated CFG may be symbolic)")
        elif not isinstance(value, (int, float, bool)) and value is not None:
            raise ExportError(f"graph input {node.name} is a {type(value).__name__}; export handles tensors and sizes only")


def _signatures(cap: Capture) -> dict[str, tuple[list[Any], str | None]]:
    """Distinct user-input signatures of the example calls, plus the half batch of each
    batch-concatenated one (what CFG reuse runs). Maps id -> (flat args, id it halves)."""
    runner, info = cap.runner, cap.runner.inputs
    out: dict[str, tuple[list[Any], str | None]] = {}
    seen: dict[tuple, str] = {}
    for call in cap.calls:
        user = info.user_signature(call.flat_args)
        if user in seen:
            continue
        sig_id = seen[user] = f"s{len(seen)}"
        out[sig_id] = (call.flat_args, None)
        if info.batch_symbolic and info.batch_inputs:
            batch = call.flat_args[info.batch_inputs[0]].shape[0]
            if batch >= 2 and batch % 2 == 0:
                half = info.half_batch_args(call.flat_args, 0)
                half_user = info.user_signature(half)
                if half_user not in seen:
                    seen[half_user] = f"s{len(seen)}"
                    out[seen[half_user]] = (half, sig_id)
    return out


# ---- the walk: every stage and variant once, on the eager graphs --------------------------------
def _walk(runner: Any, args: list[Any], variants: set[str]) -> list[StageCall]:
    plan, info = runner.plan, runner.inputs
    n = len(plan.placeholders)
    state = {i for i in range(n) if i not in info.user_tensors and i not in info.symint_sources}
    env: list[Any] = [None] * plan.num_slots
    env[:n] = args
    calls: list[StageCall] = []

    def run(stage: StageGraph, role: str, fill: bool = True, extra: Sequence[Any] = (), **kw: Any) -> StageCall:
        stage_args = [env[i] for i in stage.inputs] + list(extra)
        with torch.no_grad():
            outs = tuple(stage.gm(*stage_args))
        if fill:
            for slot, value in zip(stage.outputs, outs):
                env[slot] = value
        is_param = [i in state for i in stage.inputs] + [False] * len(extra)
        call = StageCall(stage, role, stage_args, outs, is_param, **kw)
        calls.append(call)
        return call

    # The runner's walk over the plan (the sequence execution and FLOP accounting follow).
    for unit in runner.units:
        if unit.kind != "block":
            run(unit.stage, unit.kind)
            if unit.kind == "prologue" and "probe" in variants and plan.probe_refusal("prologue", 1) is None:
                run(plan.probe_variant("prologue", 1), "probe", False, [probe_value(plan, "prologue", 1, env)],
                    extra_inputs=["probe_prev"], extra_outputs=["indicator"], probe={"kind": "prologue", "blocks": 1})
            continue
        g, block = unit.block, runner.blocks[unit.block]
        run(block.stage, "block")
        if "attn_reused" in variants and block.attn_reused is not None:
            run(block.attn_reused, "attn_reused", False, [env[s] for s in block.attn_out],
                extra_inputs=[f"cached_{j}" for j in range(len(block.attn_out))])
        if "probe" in variants and plan.probe_refusal("blocks", g + 1) is None:
            # the block's own residual stands in for the previous one (shapes are what count)
            run(plan.probe_variant("blocks", g + 1), "probe", False, [env[plan.hidden_in], probe_value(plan, "blocks", g + 1, env)],
                extra_inputs=["probe_h_in", "probe_prev"], extra_outputs=["residual", "indicator"],
                probe={"kind": "blocks", "blocks": g + 1})
    return calls


# ---- writers -----------------------------------------------------------------------------------
class _OnnxWriter:
    def __init__(self, out: Path, opset: int | None) -> None:
        self.dir = out / "onnx"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.opset = opset
        self.weights = WeightFile(self.dir)
        self._models: dict[tuple, Any] = {}
        self.graphs = 0
        self.files = 0

    def write(self, call: StageCall, io: StageIO, sig_id: str) -> str:
        key = graph_key(call.stage.gm, call.args, io)
        self.last_key = key
        if key in self._models:
            model = with_params(self._models[key], call.args, io)
        else:
            model = export_onnx(call.stage.gm, call.args, io, self.opset)
            self._models[key] = model
            self.graphs += 1
            model = with_params(model, call.args, io)  # a copy: the cached one keeps inline data
        self.weights.externalize(model)
        rel = f"onnx/{call.stage.name}.{sig_id}.onnx"
        (self.out / rel).write_bytes(model.SerializeToString())
        self.files += 1
        return rel

    def verify(self, rel: str, call: StageCall, io: StageIO, atol: float) -> float:
        self.weights._file.flush()
        from .ort_runtime import OrtLoader

        fn = OrtLoader(threads=1).load(self.out / rel)
        got = fn({f"in_{i}": a for i, (a, k) in enumerate(zip(call.args, io.kinds)) if k == "data"})
        return _compare(rel, got, [o for o in call.outputs if isinstance(o, torch.Tensor)], atol)

    def finish(self) -> None:
        self.weights.close()

    def extra_files(self) -> set[str]:
        return set()  # the stage files and weights.bin are all the runtime reads

    def weights_json(self) -> dict:
        return {"file": f"onnx/{self.weights.name}", "bytes": self.weights.size, "unique_tensors": self.weights.unique_tensors}


class _InductorWriter:
    """Saved inductor artifacts (``torch._inductor.standalone_compile`` + ``.save``): one per
    structural key and signature, parameters kept as inputs so blocks share one artifact;
    parameters go to ``params.safetensors``."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "inductor"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = out
        self._done: dict[tuple, str] = {}
        self._params: dict[str, torch.Tensor] = {}
        self._slot_of: dict[int, int] = {}
        self.graphs = 0
        self.files = 0

    def write(self, call: StageCall, io: StageIO, sig_id: str) -> str:
        from .artifacts import compile_and_save

        for pos, (slot, p) in enumerate(zip(call.stage.inputs, call.is_param)):
            if p and f"p{slot}" not in self._params:
                self._params[f"p{slot}"] = call.args[pos].detach().contiguous().clone()
        key = graph_key(call.stage.gm, call.args, io, keep_params=True)
        self.last_key = key
        if key not in self._done:
            rel = f"inductor/{key}.{sig_id}.bin"
            compile_and_save(call.stage.gm, call.args, io, self.out / rel)
            self._done[key] = rel
            self.graphs += 1
            self.files += 1
        return self._done[key]

    def verify(self, rel: str, call: StageCall, io: StageIO, atol: float) -> float:
        return 0.0  # compile_and_save checks each artifact against the eager stage when it is made

    def finish(self) -> None:
        from safetensors.torch import save_file

        save_file(self._params, str(self.dir / "params.safetensors"))

    def extra_files(self) -> set[str]:
        """The built kernels in ``inductor/cache`` (Note [kernel cache]): loading runs them."""
        from .artifacts import kernel_files

        return kernel_files(self.out)

    def weights_json(self) -> dict:
        return {"file": "inductor/params.safetensors", "tensors": len(self._params)}


def _compare(what: str, got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], atol: float) -> float:
    if len(got) != len(want):
        raise ExportError(f"{what}: {len(got)} outputs, the eager stage has {len(want)}")
    err = 0.0
    for j, (g, w) in enumerate(zip(got, want)):
        if tuple(g.shape) != tuple(w.shape):
            raise ExportError(f"{what}: output {j} has shape {tuple(g.shape)}, the eager stage {tuple(w.shape)}")
        e = float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
        scale = max(1.0, float(w.double().abs().max())) if w.numel() else 1.0
        if not e <= atol * scale:
            raise ExportError(f"{what}: output {j} differs from the eager stage by {e:.3g} (tolerance {atol * scale:.3g})")
        err = max(err, e)
    return err


# ---- manifest parts ----------------------------------------------------------------------------
def _model_json(cap: Capture) -> dict:
    model = cap.model
    config = dict(getattr(model, "config", {}) or {})
    try:
        config = encode_config(config)
    except ManifestError:
        config = {k: v for k, v in config.items() if _jsonable(v)}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    cls = type(model)
    # Note [weights fingerprint]: the loaded transformer answers this, so a policy whose defaults
    # depend on the weights (mixcache's calibration per model) binds as it would to the model.
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "config": config, "dtype": dtype_name(dtype),
            "forward_params": cap.forward_params, "weights_fingerprint": fingerprint(model)}


def encode_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if _jsonable(v)}


def _jsonable(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_jsonable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    return False


def _call_json(cap: Capture) -> dict:
    runner = cap.runner
    info = runner.inputs
    first = cap.calls[0]
    placeholders = []
    for i, node in enumerate(runner.plan.placeholders):
        if i in info.user_tensors:
            path = _find_path(first.call, first.flat_args[i])
            if path is None:
                raise ExportError(f"cannot tell which transformer argument graph input {node.name} comes from")
            placeholders.append({"kind": "user", "name": node.name, "path": path})
        elif i in info.symint_sources:
            placeholders.append({"kind": "symint", "name": node.name})
        else:
            placeholders.append({"kind": "param", "name": node.name})
    fixed = {k: v for k, v in first.call.items()
             if k != "return_dict" and (v is None or isinstance(v, (bool, int, float, str)))}
    return {"placeholders": placeholders, "fixed": fixed, "num_outputs": len(runner.plan.output_spec)}


def _find_path(call: dict[str, Any], target: torch.Tensor) -> list | None:
    for name, value in call.items():
        if value is target:
            return [name]
        if isinstance(value, (tuple, list)):
            for j, v in enumerate(value):
                if v is target:
                    return [name, j]
        if isinstance(value, dict):
            for k, v in value.items():
                if v is target:
                    return [name, k]
    return None


def _inputs_json(runner: Any) -> dict:
    info = runner.inputs
    return {"user_tensors": info.user_tensors, "timestep": info.timestep, "batch_inputs": info.batch_inputs,
            "symint_sources": {str(k): list(v) for k, v in info.symint_sources.items()}, "batch_symbolic": info.batch_symbolic}
