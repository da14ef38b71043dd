"""The runtime's hooks for adaptive policies: in-graph probe indicators, histories, reports."""

from __future__ import annotations

import math

import torch

from mixcache_compile import CacheSession
from mixcache_compile.policies.protocol import FULL, PROBE, Action, ActionKind, CacheNeeds, Probe
from tests.tiny_models import wan


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().mean() / (b.abs().mean() + 1e-12)).item()


class ProbePolicy:
    """Probe every call; skip blocks [1, 3) when the indicator is small."""

    name = "probe-test"

    def __init__(self, kind: str, threshold: float) -> None:
        self.kind, self.threshold, self.seen = kind, threshold, []

    def needs(self, model):
        return CacheNeeds(ranges={(1, 3)}, outputs=True, probe=Probe(self.kind, blocks=1))

    def decide(self, obs):
        return PROBE

    def after_probe(self, obs, indicator):
        self.seen.append((obs.step, obs.branch, indicator))
        if indicator >= self.threshold:
            return FULL
        return Action(ActionKind.BLOCK, block_range=(1, 3)) if self.kind == "blocks" else Action(ActionKind.STEP)

    def reset(self):
        pass


def _loop(model, make, session, steps: int = 5):
    compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"}, fullgraph=True)
    base = make(1, seed=0)
    outs = []
    with torch.no_grad():
        for step in range(steps):
            kwargs = {**base, "hidden_states": base["hidden_states"] * (1 - 0.02 * step), "timestep": torch.tensor([900.0 - 50 * step])}
            with session.context("cond", step_index=step):
                outs.append(compiled(**kwargs)[0])
    return outs


def test_block_probe_indicator_is_rel_l1_of_first_block_residual():
    model, make = wan()
    # Hand reference: the first block's residual on every call, from eager hooks.
    residuals = []
    h = model.blocks[0].register_forward_hook(lambda m, a, k, out: residuals.append(out - k.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    base = make(1, seed=0)
    with torch.no_grad():
        for step in range(5):
            model(**{**base, "hidden_states": base["hidden_states"] * (1 - 0.02 * step), "timestep": torch.tensor([900.0 - 50 * step])})
    h.remove()
    policy = ProbePolicy("blocks", threshold=-1.0)  # never reuse: every call computes, every residual updates
    session = CacheSession(policy)
    _loop(model, make, session)
    indicators = [e.indicator for e in session.trace]
    assert math.isinf(indicators[0])
    for i in range(1, 5):
        assert abs(indicators[i] - _rel_l1(residuals[i], residuals[i - 1])) <= 1e-5 * max(1.0, indicators[i])
    assert [e.action for e in session.trace] == ["FULL"] * 5


def test_block_probe_then_block_reuse_matches_static_block_schedule():
    """After the probe decides BLOCK(1-3), the result equals a static BLOCK(1-3) at those steps."""
    model, make = wan()
    policy = ProbePolicy("blocks", threshold=0.5)
    probed = CacheSession(policy)
    got = _loop(model, make, probed)
    reused = [e.step for e in probed.trace if e.action == "BLOCK(1-3)"]
    assert reused, [e.indicator for e in probed.trace]
    static = CacheSession("static", schedule={s: "block:1-3" for s in reused})
    want = _loop(model, make, static)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    # FLOPs: a probed-and-reused call still ran block 0, prologue and epilogue.
    assert probed.stats()["computed_fraction"] == static.stats()["computed_fraction"]


def test_prologue_probe_watches_the_timestep_modulation():
    model, make = wan()
    projections = []
    h = model.condition_embedder.register_forward_hook(lambda m, a, out: projections.append(out[1]))
    base = make(1, seed=0)
    with torch.no_grad():
        for step in range(5):
            model(**{**base, "timestep": torch.tensor([900.0 - 50 * step])})
    h.remove()
    policy = ProbePolicy("prologue", threshold=-1.0)
    session = CacheSession(policy)
    _loop(model, make, session)
    indicators = [e.indicator for e in session.trace]
    assert math.isinf(indicators[0])
    for i in range(1, 5):
        assert abs(indicators[i] - _rel_l1(projections[i], projections[i - 1])) <= 1e-5 * max(1.0, indicators[i])


class ExtrapolatingPolicy:
    """STEP on odd steps, reusing current + (current - previous): checks history=2 wiring."""

    name = "extrapolate-test"

    def __init__(self) -> None:
        self.reports = []

    def needs(self, model):
        return CacheNeeds(outputs=True, history=2, deviations=True)

    def decide(self, obs):
        return Action(ActionKind.STEP) if obs.step % 2 and obs.step > 2 else FULL

    def reuse_output(self, current, previous, obs):
        return [c + (c - p) for c, p in zip(current, previous)] if previous else [c.clone() for c in current]

    def observe(self, report):
        self.reports.append(report)

    def reset(self):
        pass


def test_history_two_hands_the_last_two_computed_outputs():
    model, make = wan()
    policy = ExtrapolatingPolicy()
    session = CacheSession(policy)
    outs = _loop(model, make, session, steps=6)
    # steps 0, 1, 2, 4 computed; step 3 = 2 + (2 - 1); step 5 = 4 + (4 - 2).
    torch.testing.assert_close(outs[3], outs[2] + (outs[2] - outs[1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[5], outs[4] + (outs[4] - outs[2]), rtol=0, atol=1e-6)
    # Deviation reports: rel-L1 of each computed output against the previous computed one.
    computed = {r.step: r for r in policy.reports if r.action.kind is ActionKind.FULL}
    assert "step" not in computed[0].deviations
    assert abs(computed[4].deviations["step"] - _rel_l1(outs[4], outs[2])) < 1e-5
