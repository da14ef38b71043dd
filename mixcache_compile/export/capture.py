"""Capture: run the model once through the mixcache backend and keep what export needs.

The model (or a pipeline's transformer) is compiled with the ``mixcache`` backend on the
``eager`` engine under a recording session, exactly as ``enable`` does, and the example call
is run. We keep the ``StageRunner`` the backend built (the plan and input classification),
the flat graph arguments of each transformer call, and the keyword arguments the transformer
was called with, then restore the model and pipeline as they were.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..branches import BATCHED_CONTEXT_NAMES
from ..runtime.executor import StageRunner
from ..runtime.session import CacheSession
from ..wiring import compile_with_session, find_transformer, session_of, wire_cache_context
from .onnx_export import ExportError


@dataclass
class CapturedCall:
    flat_args: list[Any]  # the graph's inputs, in placeholder order
    call: dict[str, Any]  # the transformer's arguments, bound by parameter name
    batched: bool


@dataclass
class Capture:
    model: torch.nn.Module
    runner: StageRunner
    calls: list[CapturedCall]
    forward_params: list[str]
    owner: Any = None
    runners: set[int] = field(default_factory=set)


class _RecordingSession(CacheSession):
    """A policy-``none`` session that also keeps the arguments of every call."""

    def __init__(self, cfg: str) -> None:
        super().__init__("none", cfg=cfg)
        self.recorded: list[tuple[StageRunner, list[Any], bool]] = []

    def _run_call(self, runner: Any, args: Sequence[Any]) -> tuple[Any, ...]:
        ctx = getattr(self._local, "ctx", None)
        batched = bool((ctx is not None and ctx.batched) or self.cfg == "batched")
        self.recorded.append((runner, list(args), batched))
        return super()._run_call(runner, args)


def capture(obj: Any, call_kwargs: dict[str, Any], cfg: str = "auto") -> Capture:
    """Run ``obj(**call_kwargs)`` (a pipeline or a bare transformer) through the backend."""
    model, owner = find_transformer(obj)
    if session_of(model) is not None:
        raise ExportError("mixcache is enabled on this model; export the original (un-enabled) model or pipeline")
    session = _RecordingSession(cfg)
    compiled = compile_with_session(model, session, "eager", fullgraph=True)  # as enable() does, on eager
    seen: list[tuple[tuple, dict]] = []
    compiled.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))), with_kwargs=True)
    unwire = wire_cache_context(model, session, owner)
    try:
        if owner is not None:
            owner.transformer = compiled
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            obj(**call_kwargs) if owner is not None else compiled(**call_kwargs)
        for w in caught:
            if "not caching this graph" in str(w.message):
                raise ExportError(f"the model cannot be planned into stages ({w.message}); export needs a planned model")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    finally:
        if owner is not None:
            owner.transformer = model
        unwire()
    if not session.recorded:
        raise ExportError("the example call never reached the mixcache backend (no transformer call was made)")
    runners = {id(r) for r, _, _ in session.recorded}
    if len(runners) > 1:
        raise ExportError(
            f"the example calls traced to {len(runners)} different graphs (input shapes or Python arguments changed "
            "between calls); export supports one static graph: export each resolution to its own directory"
        )
    if len(seen) != len(session.recorded):
        raise ExportError("transformer calls and graph calls do not pair up (a call bypassed the compiled module)")
    params = _forward_params(model)
    calls = [CapturedCall(args, _bind(model, a, k), batched) for (_, args, batched), (a, k) in zip(session.recorded, seen)]
    return Capture(model, session.recorded[0][0], calls, params, owner, runners)


def _forward_params(model: torch.nn.Module) -> list[str]:
    sig = inspect.signature(model.forward)
    return [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _bind(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        bound = None
    if bound is None:
        if args:
            raise ExportError("could not bind the transformer's positional arguments to its forward signature")
        return dict(kwargs)
    out = dict(bound.arguments)
    for name, p in inspect.signature(model.forward).parameters.items():
        if p.kind is p.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
    return out


def batched_context_names() -> set[str]:
    return set(BATCHED_CONTEXT_NAMES)
