"""``mixcache bench`` methods: the uncached baselines, every policy of this project (with its
main knob swept) and the peers of ``eval/peers.py``; how each is switched on in a pipeline
(``Method.setup`` -> ``Handle``) and which ones a run selects."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .bench_config import MAIN_KNOBS, QUICK_COMPILED, QUICK_METHODS, SWEEP_OVERRIDES, BenchConfig
from .bench_workloads import Workload
from .peers import Peer, PeerContext, peer_sweep


@dataclass
class Handle:
    """A method switched on in one pipeline: reset it before a generation, read its statistics."""

    reset: Callable[[], None] = lambda: None
    stats: Callable[[], dict[str, Any]] = dict
    reset_stats: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)
    calls: Callable[[], int] | None = None  # transformer calls the method saw (mixcache sessions), None if unknown

    def check_calls(self, before: int | None, expected: int) -> None:
        """Raise if the method did not see the transformer calls of the generation that just ran."""
        if self.calls is None or before is None:
            return
        seen = self.calls() - before
        if seen != expected:
            raise RuntimeError(
                f"the mixcache session saw {seen} of the generation's {expected} transformer calls: the compiled "
                "model ran without it (the backend fell back to an uncached compile, or Dynamo reused a compiled "
                "entry that is not this session's)"
            )


@dataclass
class Method:
    id: str  # "mixcache:static(every=2)"
    family: str  # "baseline" | "mixcache" | "diffusers" | "cache-dit"
    knob: str
    setup: Callable[[Any, Workload, bool, PeerContext], Handle]  # (pipe, workload, compiled, ctx)
    compiled_by_default: bool = True  # compiled row without --compile-all
    compile_how: str = ""

    @property
    def is_baseline(self) -> bool:
        return self.family == "baseline"


def _baseline_setup(pipe: Any, workload: Workload, compiled: bool, ctx: PeerContext) -> Handle:
    if compiled:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    return Handle()


def _mixcache_method(policy: str, knobs: Callable[[Workload], dict[str, Any]] | dict[str, Any], label: str, knob_text: str,
                     compiled_by_default: bool = True) -> Method:
    def setup(pipe: Any, workload: Workload, compiled: bool, ctx: PeerContext) -> Handle:
        import mixcache_compile

        options = knobs(workload) if callable(knobs) else dict(knobs)
        session = mixcache_compile.enable(pipe, policy=policy, engine="inductor" if compiled else "eager", **options)

        def stats() -> dict[str, Any]:
            s = session.stats()
            return {"computed_fraction": s["computed_fraction"], "fallbacks": s["fallbacks"], "actions": s["actions"],
                    "summary": session.summary()}

        return Handle(reset=session.reset, stats=stats, reset_stats=session.reset_stats,
                      calls=lambda: session.stats()["calls"])

    return Method(f"mixcache:{label}", "mixcache", knob_text, setup, compiled_by_default,
                  "mixcache_compile.enable(engine='inductor')")


def _peer_method(peer: Peer, compiled_by_default: bool) -> Method:
    def setup(pipe: Any, workload: Workload, compiled: bool, ctx: PeerContext) -> Handle:
        why = peer.available()
        if why:
            raise RuntimeError(why)
        peer.enable(pipe, ctx, compiled=compiled)
        return Handle(reset=lambda: peer.reset(pipe), notes=ctx.notes)

    return Method(peer.id, peer.library, peer.knob_text, setup, compiled_by_default,
                  "cache enabled, then torch.compile(pipe.transformer)")


def main_knob(cls: type) -> tuple[str | None, Any]:
    """The knob a dynamic policy is swept over (first of ``MAIN_KNOBS`` with a numeric default)."""
    params = inspect.signature(cls).parameters
    for name in MAIN_KNOBS:
        param = params.get(name)
        if param is not None and isinstance(param.default, (int, float)) and not isinstance(param.default, bool):
            return name, param.default
    return None, None


def _more_aggressive(value: int | float) -> int | float:
    return value + 1 if isinstance(value, int) else round(value * 2, 6)


def build_methods(cfg: BenchConfig) -> tuple[list[Method], list[dict[str, str]]]:
    """All methods (baseline first) and the ones that could not be included, with why."""
    from ..policies import POLICIES, config_class

    skipped: list[dict[str, str]] = []
    methods = [Method("baseline:uncached", "baseline", "", _baseline_setup, True, "torch.compile(pipe.transformer, fullgraph=True)")]
    methods.append(_mixcache_method("none", {}, "none", "", compiled_by_default=True))
    methods.append(_mixcache_method("static", {"every": 2, "reuse": "step"}, "static(every=2)", "every=2, reuse=step"))
    methods.append(_mixcache_method("static", {"every": 3, "reuse": "step"}, "static(every=3)", "every=3, reuse=step", False))

    def block_schedule(w: Workload) -> dict[str, Any]:
        last = w.num_layers - 1  # skip blocks 1..L-2 (first and last computed) on every other step
        if last < 2:
            raise ValueError(f"the block schedule needs at least 3 blocks, the model has {w.num_layers}")
        return {"schedule": {s: f"block:1-{last}" for s in range(2, w.steps - 1, 2)}}

    methods.append(_mixcache_method("static", block_schedule, "static(block)", "blocks 1..L-2 reused on even steps 2..n-2"))
    for name in POLICIES:
        if name in ("none", "static"):
            continue
        try:
            cls = config_class(name)  # its fields are the options, with their defaults
            knob, default = main_knob(cls)
        except Exception as err:  # ValueError from the registry, or an import-time error
            skipped.append({"method": f"mixcache:{name}", "reason": f"{type(err).__name__}: {err}"})
            continue
        methods.append(_mixcache_method(name, {}, name, "defaults"))
        params = inspect.signature(cls).parameters
        overrides = [(k, c) for k, c in SWEEP_OVERRIDES.get(name, []) if set(k) <= set(params)]
        if overrides:
            for knobs, compiled_default in overrides:
                text = ", ".join(f"{k}={v}" for k, v in knobs.items())
                defaults = ", ".join(f"{k}={params[k].default}" for k in knobs)
                methods.append(_mixcache_method(name, knobs, f"{name}({text})", f"{text} (defaults {defaults})", compiled_default))
            continue
        if knob is None:
            skipped.append({"method": f"mixcache:{name} sweep", "reason": f"no knob among {MAIN_KNOBS}: defaults only"})
            continue
        value = _more_aggressive(default)
        methods.append(_mixcache_method(name, {knob: value}, f"{name}({knob}={value:g})", f"{knob}={value:g} (default {default:g})", False))
    seen: set[str] = set()
    for peer in peer_sweep(quick=False):
        first = peer.name not in seen
        seen.add(peer.name)
        methods.append(_peer_method(peer, compiled_by_default=first))
    if cfg.quick and cfg.methods is None:
        methods = [m for m in methods if m.is_baseline or _matches(m.id, QUICK_METHODS, exact=True)]
    elif cfg.methods is not None:
        methods = [m for m in methods if m.is_baseline or _matches(m.id, cfg.methods)]
    return methods, skipped


def _matches(method_id: str, patterns: Sequence[str], exact: bool = False) -> bool:
    """fnmatch patterns (``*``, ``?``); a pattern without wildcards matches as a substring
    (or, with ``exact``, only the whole id)."""
    ident = method_id.lower()
    for pat in patterns:
        pat = pat.lower()
        if "*" in pat or "?" in pat:
            if fnmatch.fnmatchcase(ident, pat.replace("[", "[[]")):
                return True
        elif pat == ident or (not exact and pat in ident):
            return True
    return False


def compiled_rows_for(cfg: BenchConfig, methods: list[Method]) -> list[Method]:
    if not cfg.compile:
        return []
    if cfg.quick and cfg.methods is None:
        return [m for m in methods if _matches(m.id, QUICK_COMPILED, exact=True)]
    return [m for m in methods if m.is_baseline or cfg.compile_all or m.compiled_by_default]
