"""Exported engines that keep caching: stage graphs written as ONNX (or saved inductor
artifacts) plus a manifest, run by the same ``CacheSession`` state machine.

    from mixcache_compile.export import export, ExportedTransformer
    export(pipe, {"prompt_embeds": ..., "num_inference_steps": 2, ...}, "out/wan-onnx", policy="static", every=2)
    ExportedTransformer("out/wan-onnx").install(pipe)      # onnxruntime, no torch.compile
    video = pipe(...)

TensorRT: ``tensorrt.build_engines(directory)`` (needs CUDA and the ``tensorrt`` extra), then
``ExportedTransformer(directory, "tensorrt")``. Saved inductor artifacts:
``export(..., format="inductor")`` then ``ExportedTransformer(directory)``: these execute code
when loaded, so load them only from sources you trust. Loading checks every file against the
SHA-256 the manifest records (``IntegrityError``). See docs/export.md.
"""

from .compat import ExportVersionError, ExportVersionWarning
from .exporter import VARIANTS, ExportReport, export
from .integrity import IntegrityError
from .manifest import MANIFEST_NAME, VERSION, Manifest, ManifestError
from .onnx_export import ExportError
from .ort_transformer import OrtTransformer
from .runtime import ExportedTransformer, load


def main(argv: list[str] | None = None) -> int:
    """``mixcache export MODEL_OR_PIPE --format onnx --out DIR`` (see ``cli.py`` in this package)."""
    from .cli import main as _main

    return _main(argv)


__all__ = [
    "export", "ExportReport", "VARIANTS", "Manifest", "ManifestError", "MANIFEST_NAME", "VERSION", "ExportError",
    "ExportedTransformer", "OrtTransformer", "load", "main", "IntegrityError", "ExportVersionError", "ExportVersionWarning",
]
