"""Saved inductor artifacts: compiled stages written to disk and loaded by a later process.

torch 2.13 has ``torch._inductor.standalone_compile(gm, example_inputs,
dynamic_shapes="from_example_inputs")`` returning a ``CompiledArtifact`` with
``.save(path=..., format="binary")`` and ``torch._inductor.CompiledArtifact.load(path=...,
format="binary")`` (a bundle of the FX-graph and AOT-autograd cache entries; loading it fills
the local caches and runs no inductor compile). Each stage is compiled once per structural
key and input signature with its parameters as inputs, so equal blocks share one artifact
(as the in-process inductor engine does); the parameters go to ``params.safetensors``.

Use ``export(..., format="inductor")`` to write, ``ExportedTransformer(directory)`` (engine
"inductor") to run; ``InductorArtifactLoader.loads``/``compiles`` count what happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .onnx_export import ExportError, StageIO, bake_stage, data_args


def compile_and_save(gm: fx.GraphModule, args: Sequence[Any], io: StageIO, path: Path, atol: float = 1e-4) -> None:
    """Compile the stage (constants baked, parameters and data as inputs) and save it."""
    baked = bake_stage(gm, args, io, keep_params=True)
    inputs = data_args(args, io, kinds=("data", "param"))
    with torch.no_grad(), kernel_cache(path.parent):
        artifact = torch._inductor.standalone_compile(baked, inputs, dynamic_shapes="from_example_inputs")
        got = artifact(*inputs)
        want = baked(*inputs)
    for j, (g, w) in enumerate(zip(got, want)):
        err = float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
        if err > atol * max(1.0, float(w.double().abs().max()) if w.numel() else 1.0):
            raise ExportError(f"inductor artifact for {path.name}: output {j} differs from the eager stage by {err:.3g}")
    path.parent.mkdir(parents=True, exist_ok=True)
    artifact.save(path=str(path), format="binary")


def kernel_cache(directory: Path):
    """Inductor's cache directory pointed into the export while compiling and loading.

    Note [kernel cache]: a saved artifact holds the FX-graph and AOT-autograd cache entries,
    which include the kernels' C++ source but not the built shared objects; loading it with a
    cold cache runs no inductor compile but does run the C++ compiler once per kernel (most of
    a cold start on CPU). Compiling inside ``<export>/inductor/cache`` leaves the built kernels
    in the export, so a later process (on a machine with the same compiler and CPU flags)
    loads them as they are. The directory must be writable when loading (inductor takes locks).
    """
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    cache = Path(directory) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    return temporary_cache_dir(str(cache.resolve()))


def kernel_files(export_dir: Path) -> set[str]:
    """The files of ``<export>/inductor/cache`` (relative to the export) that loading reads:
    everything but lock files, which inductor creates and deletes as it goes."""
    cache = Path(export_dir) / "inductor" / "cache"
    if not cache.is_dir():
        return set()
    return {p.relative_to(export_dir).as_posix() for p in cache.rglob("*")
            if p.is_file() and not p.is_symlink() and "locks" not in p.relative_to(cache).parts and p.suffix != ".lock"}


class InductorArtifactLoader:
    """Loads saved artifacts (``CompiledArtifact.load``); takes the parameters as inputs."""

    name = "inductor"
    formats = ("inductor",)
    takes_params = True
    device = "cpu"

    def __init__(self) -> None:
        self.loads = 0

    def load(self, path: Path):
        from torch._inductor import CompiledArtifact

        if not path.is_file():
            raise ExportError(f"saved inductor artifact {path} is missing")
        with kernel_cache(path.parent):
            artifact = CompiledArtifact.load(path=str(path), format="binary")
        self.loads += 1

        def run(inputs: list[torch.Tensor]) -> Sequence[torch.Tensor]:
            return artifact(*inputs)

        return run

    def params(self, directory: Path, manifest: Any) -> dict[int, torch.Tensor]:
        from safetensors.torch import load_file

        state = load_file(str(Path(directory) / manifest.weights["file"]))
        return {int(k[1:]): v for k, v in state.items()}
