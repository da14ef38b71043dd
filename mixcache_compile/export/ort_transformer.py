"""``OrtTransformer(directory)``: ``ExportedTransformer`` on the onnxruntime engine.

A drop-in ``pipe.transformer`` that runs every stage through an ``InferenceSession`` while the
``CacheSession`` decides, call by call, which stages run (no torch.compile at inference). It
lives apart from ``ort_runtime.py`` (the loader) so that the runtime, which loads the loader,
and this subclass of the runtime's transformer do not import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runtime import ExportedTransformer


class OrtTransformer(ExportedTransformer):
    """``ExportedTransformer`` on onnxruntime; ``providers``/``threads`` go to each session."""

    def __init__(self, directory: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(directory, "onnxruntime", engine_options={"providers": providers, "threads": threads}, **kwargs)
