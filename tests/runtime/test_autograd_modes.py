"""Caching under every autograd mode a caller may use: ``torch.inference_mode()``,
``torch.no_grad()`` and grad enabled (a bare model call), and switching between them.

References are independent: the uncompiled model (policy none) and a fresh session run under
``no_grad`` (static schedules). Note [buffers in every autograd mode] is what makes the
switches safe; Note [autograd-free counting] is what lets the first call count FLOPs.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mixcache_compile import CacheSession
from tests.tiny_models import wan

SCHEDULE = {2: "step", (3, "uncond"): "cfg", 4: "block:1-3", 5: "attn:0,1"}
MODES = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "grad_enabled": contextlib.nullcontext,
}


def _compile(model, session, engine: str = "eager"):
    return torch.compile(model, backend="mixcache", options={"session": session, "engine": engine}, fullgraph=True)


def _generation(compiled, make, session, modes: list[str], seed: int = 0) -> list[torch.Tensor]:
    """One generation of ``len(modes)`` steps x (cond, uncond); step i runs under ``modes[i]``."""
    outs = []
    for step, mode in enumerate(modes):
        kwargs = {**make(1, seed=seed + step), "timestep": torch.tensor([900.0 - 100 * step])}
        for branch in ("cond", "uncond"):
            with MODES[mode](), session.context(branch, step_index=step, num_inference_steps=len(modes)):
                outs.append(compiled(**kwargs)[0])
    return outs


def _no_grad_reference(steps: int = 6, seed: int = 0) -> tuple[list[torch.Tensor], CacheSession]:
    model, make = wan()
    session = CacheSession("static", schedule=SCHEDULE)
    return _generation(_compile(model, session), make, session, ["no_grad"] * steps, seed), session


def _buffers_are_plain(session: CacheSession) -> bool:
    buffers = list(session._store._buffers.values())
    return bool(buffers) and all(not b.is_inference() and not b.requires_grad and b.grad_fn is None for b in buffers)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_policy_none_equals_eager_in_every_mode(mode: str):
    model, make = wan()
    session = CacheSession("none")
    compiled = _compile(model, session)
    got = _generation(compiled, make, session, [mode] * 3)
    with torch.no_grad():
        want = [model(**{**make(1, seed=s), "timestep": torch.tensor([900.0 - 100 * s])})[0] for s in range(3) for _ in (0, 1)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.detach(), w, rtol=0, atol=1e-5)
    stats = session.stats()
    assert stats["calls"] == 6 and stats["computed_fraction"] == 1.0
    # FLOPs counted in every mode (Note [autograd-free counting]) equal torch's FLOP counter
    # on the uncompiled model under no_grad: the count does not depend on the mode.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**{**make(1, seed=0), "timestep": torch.tensor([900.0])})
    assert stats["flops_run"] == stats["flops_full"] == 6 * counter.get_total_flops() > 0
    assert not stats["flops_unknown"] and not stats["flops_from_real_tensors"]


def test_static_schedule_in_each_mode_equals_a_no_grad_run_and_switches_between_generations():
    want, fresh = _no_grad_reference()
    model, make = wan()
    session = CacheSession("static", schedule=SCHEDULE)
    compiled = _compile(model, session)
    for generation, mode in enumerate(["inference_mode", "grad_enabled", "no_grad", "inference_mode"]):
        got = _generation(compiled, make, session, [mode] * 6)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.detach(), w, rtol=0, atol=1e-6)
        assert [e.action for e in session.trace[12 * generation:]] == [e.action for e in fresh.trace]
        assert _buffers_are_plain(session), f"a cache buffer is an inference tensor or in autograd after {mode}"
    stats = session.stats()
    assert stats["generations"] == 4 and not stats["fallbacks"]
    assert stats["computed_fraction"] == pytest.approx(fresh.stats()["computed_fraction"])


def test_a_mode_switch_mid_generation_never_reuses_a_wrong_tensor():
    """Each autograd mode is its own Dynamo graph; the backend hands the equal graph the same
    stage runner (runtime/entry.py), so the session keeps its caches across the switch and
    the schedule runs as planned: every output equals the same schedule run in one mode, and
    no call falls back."""
    model, make = wan()
    schedule = {1: "step", 2: "step", 3: "step"}
    session = CacheSession("static", schedule=schedule)
    compiled = _compile(model, session)
    got = _generation(compiled, make, session, ["inference_mode", "inference_mode", "no_grad", "no_grad"])
    one_mode = CacheSession("static", schedule=schedule)
    want = _generation(_compile(wan()[0], one_mode), make, one_mode, ["no_grad"] * 4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    with torch.no_grad():  # steps 1-3 reuse step 0: the uncached model's first output
        first = model(**{**make(1, seed=0), "timestep": torch.tensor([900.0])})[0]
    torch.testing.assert_close(got[6], first, rtol=0, atol=1e-5)
    assert [e.action for e in session.trace] == ["FULL", "FULL"] + ["STEP"] * 6
    assert not session.stats()["fallbacks"]


def test_grad_enabled_call_keeps_no_autograd_graph_in_the_cache():
    model, make = wan()
    session = CacheSession("static", schedule={1: "step"})
    compiled = _compile(model, session)
    kwargs = make(1)
    with session.context("cond", step_index=0):
        computed = compiled(**kwargs)[0]
    with session.context("cond", step_index=1):
        reused = compiled(**{**kwargs, "timestep": torch.tensor([400.0])})[0]
    assert computed.requires_grad, "a computed call keeps its gradient path, as the eager model does"
    assert not reused.requires_grad and torch.equal(reused, computed.detach())
    assert _buffers_are_plain(session)


@pytest.mark.inductor
def test_inductor_engine_in_every_mode_and_a_switch():
    model, make = wan()
    session = CacheSession("static", schedule={2: "step", (3, "uncond"): "cfg"})
    compiled = _compile(model, session, engine="inductor")
    reference = CacheSession("static", schedule={2: "step", (3, "uncond"): "cfg"})
    want = _generation(_compile(wan()[0], reference), make, reference, ["no_grad"] * 4)
    # (each mode is a compile of its own: the two ends, no_grad being covered on the eager engine)
    for mode in ("inference_mode", "grad_enabled"):
        got = _generation(compiled, make, session, [mode] * 4)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.detach(), w, rtol=0, atol=1e-4)
    assert not session.stats()["fallbacks"] and session.stats()["actions"]["STEP"] == 4
