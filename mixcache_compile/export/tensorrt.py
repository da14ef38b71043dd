"""TensorRT engines from an ONNX export: the same manifest, the same cache state machine.

``build_engines(directory)`` parses every ONNX stage file with TensorRT's ONNX parser and
writes a serialized engine (``tensorrt/<stage>.<signature>.plan``) plus ``tensorrt/index.json``
(source file hash -> plan, so a rebuild skips unchanged files); ``ExportedTransformer(directory,
"tensorrt")`` then runs them, stage by stage, under the ``CacheSession``. The flow follows
torch_tensorrt's own backend: a thin entry, a settings dataclass, one build function.

TensorRT is optional (the ``tensorrt`` extra) and imported lazily; without a CUDA device or
without the package, ``check_tensorrt`` raises one ``TensorRTUnavailable`` naming everything
that is missing. The builder is pluggable (``builder=``): the tests assemble an engine set with
a fake builder on a machine with no GPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .integrity import IntegrityError, check_relative, verify_files
from .manifest import Manifest
from .onnx_export import ExportError

INDEX = "index.json"


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot run here; the message lists what is missing."""


def check_tensorrt() -> Any:
    """The ``tensorrt`` module, or ``TensorRTUnavailable`` naming what is missing."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA device (torch.cuda.is_available() is False"
                       + ("; this torch is a CPU build" if torch.version.cuda is None else "") + ")")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        tensorrt = None
        missing.append("the 'tensorrt' Python package (pip install 'mixcache-compile[tensorrt]')")
    if missing:
        raise TensorRTUnavailable("TensorRT engines need " + " and ".join(missing)
                                  + "; run the export on onnxruntime instead (engine='onnxruntime')")
    return tensorrt


@dataclass(frozen=True)
class TensorRTSettings:
    fp16: bool = False
    workspace_bytes: int = 1 << 30
    optimization_level: int = 3


class Builder(Protocol):
    """Makes and loads serialized engines. ``build`` turns one ONNX file into bytes;
    ``load`` turns those bytes into a callable ``{input name: tensor} -> [output tensors]``."""

    def build(self, onnx_path: Path, settings: TensorRTSettings) -> bytes: ...

    def load(self, plan: bytes) -> Callable[[dict[str, torch.Tensor]], Sequence[torch.Tensor]]: ...


@dataclass
class EngineSet:
    """The plans of one export: source ONNX file -> plan file (relative to the export)."""

    directory: Path
    plans: dict[str, str]
    built: int
    reused: int


def build_engines(directory: str | Path, *, builder: Builder | None = None,
                  settings: TensorRTSettings | None = None, verify: bool = True) -> EngineSet:
    """Build (or reuse, when the ONNX file is unchanged) one TensorRT plan per stage file.
    The export is checked first (``verify=False`` skips it): no plan is built from a corrupted file."""
    directory = Path(directory)
    manifest = Manifest.load(directory, verify=verify)
    if verify:
        verify_files(directory, manifest.files)
    if manifest.format != "onnx":
        raise ExportError(f"TensorRT engines are built from an ONNX export; {directory} holds a {manifest.format} export")
    builder = builder or OnnxParserBuilder()
    settings = settings or TensorRTSettings()
    out = directory / "tensorrt"
    out.mkdir(exist_ok=True)
    index_path = out / INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    plans, built, reused = {}, 0, 0
    for entry in manifest.stages.values():
        for f in entry.files.values():
            src = directory / f.file
            digest = hashlib.sha1(src.read_bytes() + json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()
            rel = f"tensorrt/{Path(f.file).stem}.plan"
            known = index.get(f.file)
            if known and known["sha1"] == digest and known.get("plan_sha256") and (directory / rel).is_file():
                reused += 1
            else:
                plan = builder.build(src, settings)
                (directory / rel).write_bytes(plan)
                index[f.file] = {"plan": rel, "sha1": digest, "plan_sha256": hashlib.sha256(plan).hexdigest()}
                built += 1
            plans[f.file] = rel
    index_path.write_text(json.dumps(index, indent=1))
    return EngineSet(directory, plans, built, reused)


class TensorRTLoader:
    """Loader of the ``tensorrt`` engine: the plan built for each ONNX stage file."""

    name = "tensorrt"
    formats = ("onnx",)
    takes_params = False

    def __init__(self, builder: Builder | None = None, device: str | None = None) -> None:
        if builder is None:
            check_tensorrt()
        self.builder = builder or OnnxParserBuilder()
        self.device = device or ("cuda" if builder is None else "cpu")
        self._index: dict[str, Any] | None = None

    def load(self, path: Path):
        directory = path.parent.parent  # <export>/onnx/<file>.onnx
        if self._index is None:
            index_path = directory / "tensorrt" / INDEX
            if not index_path.is_file():
                raise ExportError(f"no TensorRT engines in {directory}: build them first (mixcache_compile.export.tensorrt.build_engines)")
            self._index = json.loads(index_path.read_text())
        rel = path.relative_to(directory).as_posix()
        if rel not in self._index:
            raise ExportError(f"no TensorRT engine was built for {rel}: run build_engines again")
        record = self._index[rel]
        plan_path = directory / check_relative(record["plan"])
        if not plan_path.is_file():
            raise IntegrityError(f"TensorRT plan {plan_path} is missing: run build_engines again")
        plan = plan_path.read_bytes()
        if hashlib.sha256(plan).hexdigest() != record.get("plan_sha256"):
            raise IntegrityError(f"TensorRT plan {plan_path} does not match the SHA-256 build_engines recorded "
                                 "(corrupted, or built by an older version): run build_engines again")
        return self.builder.load(plan)


class OnnxParserBuilder:
    """TensorRT's ONNX parser and builder (static shapes: one plan per stage file)."""

    def __init__(self) -> None:
        self.trt = check_tensorrt()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)

    def build(self, onnx_path: Path, settings: TensorRTSettings) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        config.builder_optimization_level = settings.optimization_level
        if settings.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ExportError(f"TensorRT failed to build an engine for {onnx_path.name}")
        return bytes(plan)

    def load(self, plan: bytes):
        trt = self.trt
        engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        out_specs = [(tuple(engine.get_tensor_shape(n)), _torch_dtype(trt, engine.get_tensor_dtype(n))) for n in outputs]

        def run(data: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            keep = []
            for n in inputs:
                t = data[n].to("cuda").contiguous()
                keep.append(t)
                context.set_tensor_address(n, t.data_ptr())
            results = [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in out_specs]
            for n, t in zip(outputs, results):
                context.set_tensor_address(n, t.data_ptr())
            stream = torch.cuda.current_stream()
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            return results

        return run


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for name, tdtype in (("int64", torch.int64), ("bfloat16", torch.bfloat16)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = tdtype
    return table[dtype]
