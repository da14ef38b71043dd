"""Engines that run stage graphs in-process: ``eager`` and ``inductor``. Exported stages (ONNX,
TensorRT plans, saved inductor artifacts) run through ``mixcache_compile.export``'s loaders."""

from __future__ import annotations

from typing import Any

from .base import Engine
from .eager import EagerEngine
from .inductor import InductorEngine

ENGINES = {"eager": EagerEngine, "inductor": InductorEngine}


def make_engine(engine: str | Engine, mode: str | None = None, options: dict[str, Any] | None = None) -> Engine:
    """An engine by name. ``mode``/``options`` (torch.compile's) configure the inductor
    engine; given to another engine they are refused rather than silently ignored."""
    if not isinstance(engine, str):
        if mode not in (None, "default") or options:
            raise TypeError("mode/inductor options apply to engine='inductor', not to an engine object")
        return engine
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(sorted(ENGINES))}")
    if engine == "inductor":
        return InductorEngine(mode, options)
    if mode not in (None, "default") or options:
        raise ValueError(f"mode/inductor options apply to engine='inductor', not {engine!r}")
    return ENGINES[engine]()


__all__ = ["Engine", "ENGINES", "make_engine"]
