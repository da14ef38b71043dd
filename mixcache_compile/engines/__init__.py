"""Engines that run stage graphs in-process: ``eager`` and ``inductor``. Exported stages (ONNX,
TensorRT plans, saved inductor artifacts) run through ``mixcache_compile.export``'s loaders."""

from __future__ import annotations

from .base import Engine
from .eager import EagerEngine
from .inductor import InductorEngine

ENGINES = {"eager": EagerEngine, "inductor": InductorEngine}


def make_engine(engine: str | Engine) -> Engine:
    if not isinstance(engine, str):
        return engine
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(sorted(ENGINES))}")
    return ENGINES[engine]()


__all__ = ["Engine", "ENGINES", "make_engine"]
