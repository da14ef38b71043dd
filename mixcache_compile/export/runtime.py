"""The exported-model runtime: the same ``CacheSession`` state machine and ``StageRunner`` as
the torch backend, driving stage files named by a manifest instead of compiled FX graphs.

``ManifestRunner`` is a ``StageRunner`` built from the manifest's plan (its stage graphs have
no GraphModule): it differs only where the torch runner reads a graph, namely FLOPs (counted
at export time) and probe variants (exported files instead of graph rewrites), both given
through the runner's public extension points.
``ManifestEngine`` is an ``Engine``: ``get(stage, args)`` finds the file exported for that
stage at the arguments' shapes and returns its callable from a ``Loader`` (onnxruntime,
TensorRT, saved inductor artifacts). ``ExportedTransformer`` is a drop-in ``transformer`` of a
diffusers pipeline: ``forward(...)``, ``config``, ``dtype``, ``device``, ``cache_context``.
No torch.compile runs anywhere on this path.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ..passes.stage_graph import StageGraph
from ..policies import PolicyConfig
from ..runtime.executor import StageRunner
from ..runtime.session import CacheSession
from ..wiring import announce_call
from .compat import check_versions
from .integrity import verify_files
from .manifest import Manifest, StageFile, dtype_name, policy_from_json
from .onnx_export import ExportError



class Loader(Protocol):
    """Turns one exported file into a callable. ``takes_params``: the callable wants the
    parameters as inputs (saved inductor artifacts) rather than holding them (ONNX, TensorRT)."""

    name: str
    formats: tuple[str, ...]
    takes_params: bool

    def load(self, path: Path) -> Callable[..., Sequence[torch.Tensor]]: ...


ENGINE_FORMATS = {"onnxruntime": "onnx", "tensorrt": "onnx", "inductor": "inductor"}
DEFAULT_ENGINE = {"onnx": "onnxruntime", "inductor": "inductor"}


def make_loader(engine: str, manifest: Manifest, **options: Any) -> Loader:
    if engine not in ENGINE_FORMATS:
        raise ExportError(f"unknown exported engine {engine!r}; valid engines: {', '.join(sorted(ENGINE_FORMATS))}")
    if ENGINE_FORMATS[engine] != manifest.format:
        valid = [e for e, f in ENGINE_FORMATS.items() if f == manifest.format]
        raise ExportError(f"engine {engine!r} runs {ENGINE_FORMATS[engine]} exports; this directory holds a "
                          f"{manifest.format} export (engines for it: {', '.join(valid)})")
    if engine == "onnxruntime":
        from .ort_runtime import OrtLoader

        return OrtLoader(**options)
    if engine == "tensorrt":
        from .tensorrt import TensorRTLoader

        return TensorRTLoader(**options)
    from .artifacts import InductorArtifactLoader

    return InductorArtifactLoader(**options)


class ManifestEngine:
    """An ``Engine`` over exported files: one callable per stage file, loaded on first use."""

    def __init__(self, manifest: Manifest, directory: Path, loader: Loader, verify: bool = True) -> None:
        self.manifest = manifest
        self.directory = directory
        self.loader = loader
        self.verify = verify
        self.name = loader.name
        self.loads = 0
        self._raw: dict[str, Callable[..., Sequence[torch.Tensor]]] = {}

    def file_for(self, stage: StageGraph, args: Sequence[Any]) -> StageFile:
        entry = self.manifest.stages.get(stage.name)
        if entry is None:
            raise ExportError(f"stage {stage.name!r} is not in the export at {self.directory}")
        for f in entry.files.values():
            if _matches(f, args):
                return f
        have = sorted({str([m[0] for m in f.data_meta]) for f in entry.files.values()})
        got = [list(a.shape) for a, k in zip(args, next(iter(entry.files.values())).kinds) if k == "data" and isinstance(a, torch.Tensor)]
        raise ExportError(f"no exported specialisation of stage {stage.name!r} for input shapes {got}; exported: {have}. "
                          "Exports are static: export again with example inputs of these shapes")

    def get(self, stage: StageGraph, args: Sequence[Any]) -> Callable[..., tuple[Any, ...]]:
        f = self.file_for(stage, args)
        raw = self._raw.get(f.file)
        if raw is None:
            if self.verify:
                # Files load lazily, possibly long after construction checked them: check every
                # file again (a stat each, Note [verified once per process]; a loader may read
                # weights or kernels beside its file) so one changed since, e.g. by a re-export
                # into this directory, is refused rather than run with this manifest.
                verify_files(self.directory, self.manifest.files)
            raw = self._raw[f.file] = self.loader.load(self.directory / f.file)
            self.loads += 1
        data_idx = [i for i, k in enumerate(f.kinds) if k == "data"]
        names = [f"in_{i}" for i in data_idx]
        ordered = [i for i, k in enumerate(f.kinds) if k != "const"]
        out_tensor, out_consts = f.out_tensor, f.out_consts
        takes_params = self.loader.takes_params

        def run(*stage_args: Any) -> tuple[Any, ...]:
            if takes_params:
                outs = raw([stage_args[i] for i in ordered])
            else:
                outs = raw({n: stage_args[i] for n, i in zip(names, data_idx)})
            it = iter(outs)
            return tuple(next(it) if t else out_consts[j] for j, t in enumerate(out_tensor))

        return run

    def flops(self, stage: StageGraph, args: Sequence[Any]) -> int:
        return self.file_for(stage, args).flops


def _matches(f: StageFile, args: Sequence[Any]) -> bool:
    if len(args) != len(f.kinds):
        return False
    metas = iter(f.data_meta)
    for i, (a, kind) in enumerate(zip(args, f.kinds)):
        if kind == "data":
            shape, dtype = next(metas)
            if not isinstance(a, torch.Tensor) or list(a.shape) != shape or dtype_name(a.dtype) != dtype:
                return False
        elif kind == "const" and a != f.consts[i]:
            return False
    return True


class ManifestRunner(StageRunner):
    """The torch backend's ``StageRunner``, over a manifest's plan and a ``ManifestEngine``,
    through the runner's extension points: the plan's probe variants are the exported ones,
    and FLOPs are those counted at export time (``stage_flops``, ``count_full_flops``)."""

    def __init__(self, manifest: Manifest, engine: ManifestEngine, session: CacheSession) -> None:
        plan = manifest.stage_plan()
        for entry in manifest.stages.values():
            if entry.role == "probe" and entry.probe is not None:
                plan.probe_variants[(entry.probe["kind"], int(entry.probe["blocks"]))] = entry.graph()
        super().__init__(plan, engine, manifest.input_info(), session, model_key=id(engine))
        self.manifest = manifest
        self._full_by_user = {tuple((tuple(m[0]), m[1]) for m in s["user"]): s["full_flops"] for s in manifest.signatures.values()}

    def stage_flops(self, stage: StageGraph, args: Sequence[Any]) -> int:
        return self.engine.flops(stage, args)

    def count_full_flops(self, args: Sequence[Any], sig: int) -> int:
        return self._full_by_user[self.check_exported(args)]

    def check_exported(self, args: Sequence[Any]) -> tuple:
        user = tuple((tuple(args[i].shape), dtype_name(args[i].dtype)) for i in self.inputs.user_tensors)
        if user not in self._full_by_user:
            have = [[m[0] for m in s["user"]] for s in self.manifest.signatures.values()]
            raise ExportError(f"no exported specialisation for input shapes {[list(s) for s, _ in user]} "
                              f"(exported: {have}). Exports are static: export again with example inputs of these shapes")
        return user


class ExportedTransformer(torch.nn.Module):
    """A diffusers-compatible transformer running an export through the cache state machine.

    ``ExportedTransformer(directory)`` runs the manifest's policy on its default engine
    (onnxruntime for ONNX exports, inductor for saved artifacts); ``policy=`` / options or
    ``session=`` override it. ``install(pipe)`` puts it in ``pipe.transformer`` (and lets
    ``cache_context`` ask the pipeline whether batch-concatenated CFG is on).
    """

    def __init__(
        self,
        directory: str | Path,
        engine: str | None = None,
        *,
        session: CacheSession | None = None,
        policy: str | PolicyConfig | None = None,
        cfg: str | None = None,
        engine_options: dict[str, Any] | None = None,
        verify: bool = True,
        **policy_options: Any,
    ) -> None:
        super().__init__()
        self.directory = Path(directory)
        manifest = Manifest.load(self.directory, verify=verify)
        check_versions(manifest.format, manifest.created_with, str(self.directory))
        if verify:  # before any file is handed to a loader: nothing corrupted runs
            verify_files(self.directory, manifest.files)
        engine = engine or DEFAULT_ENGINE[manifest.format]
        loader = make_loader(engine, manifest, **(engine_options or {}))
        if session is None:
            s = manifest.session
            if policy is None:
                if policy_options:
                    raise TypeError("policy options go with a policy name (policy=...)")
                policy = policy_from_json(manifest.policy)
            session = CacheSession(policy, cfg=cfg or s["cfg"], branch_order=tuple(s["branch_order"]),
                                   batch_order=tuple(s["batch_order"]), **policy_options)
        elif policy is not None or policy_options or cfg is not None:
            raise TypeError("give the policy and cfg to the CacheSession, not next to it")
        # Note [weights fingerprint] (policies/fingerprint.py): the weights live in the export's
        # files, so this answers the fingerprint export recorded; binding the session to it gives
        # mixcache the traced model's calibration, as enable(model) does.
        self.weights_fingerprint: str = str(manifest.model.get("weights_fingerprint", ""))
        session.bind_model(self)
        self.manifest = manifest
        self.session = session
        self.engine = ManifestEngine(manifest, self.directory, loader, verify=verify)
        self.runner = ManifestRunner(manifest, self.engine, session)
        self._placeholders = manifest.call["placeholders"]
        self._forward_params = manifest.model["forward_params"]
        self._fixed = manifest.call["fixed"]
        self._params = loader.params(self.directory, manifest) if loader.takes_params else {}
        self._dtype = getattr(torch, manifest.model["dtype"])
        self._device = torch.device(getattr(loader, "device", "cpu"))
        self._pipe: Any = None
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(manifest.model["config"])

    # ---- what pipelines read -------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def install(self, pipe: Any) -> ExportedTransformer:
        """``pipe.transformer = self``; returns self."""
        pipe.transformer = self
        self._pipe = weakref.ref(pipe)
        return self

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """What diffusers pipelines open around each denoiser call (as ``enable`` wires it)."""
        pipe = self._pipe() if self._pipe is not None else None
        # Without a pipeline to ask, the manifest says whether the traced call was batch-concatenated CFG.
        batched_without_pipe = bool(self.manifest.session.get("batched_context"))
        with announce_call(self.session, pipe, name, kwargs, batched_without_pipe=batched_without_pipe):
            yield

    # ---- the call ------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = self._bind(args, kwargs)
        return_dict = call.pop("return_dict", True)
        for name, value in self._fixed.items():
            if name in call and call[name] != value:
                raise ExportError(f"this export was traced with {name}={value!r}; got {name}={call[name]!r} (export again with it)")
        flat: list[Any] = [None] * len(self._placeholders)
        for i, ph in enumerate(self._placeholders):
            kind = ph["kind"]
            if kind == "user":
                flat[i] = _resolve(call, ph["path"], ph["name"])
            elif kind == "param":
                flat[i] = self._params.get(i)
        for p, (t, d) in self.runner.inputs.symint_sources.items():
            flat[p] = flat[t].shape[d]
        self.runner.check_exported(flat)  # before the session sees the call: a refused call changes no state
        with torch.no_grad():
            outputs = self.runner(*flat)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=outputs[0])
        return tuple(outputs)

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if len(args) > len(self._forward_params):
            raise TypeError(f"forward takes at most {len(self._forward_params)} positional arguments")
        call = dict(zip(self._forward_params, args))
        for k, v in kwargs.items():
            if k in call:
                raise TypeError(f"forward got multiple values for {k!r}")
            call[k] = v
        return call


def _resolve(call: dict[str, Any], path: list, name: str) -> torch.Tensor:
    value: Any = call
    try:
        for part in path:
            value = value[part]
    except (KeyError, IndexError, TypeError):
        raise TypeError(f"the exported graph needs argument {'.'.join(map(str, path))} (graph input {name})") from None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"argument {'.'.join(map(str, path))} must be a tensor, got {type(value).__name__}")
    return value


def load(directory: str | Path, engine: str | None = None, **kwargs: Any) -> ExportedTransformer:
    """``ExportedTransformer(directory, engine, **kwargs)``."""
    return ExportedTransformer(directory, engine, **kwargs)
