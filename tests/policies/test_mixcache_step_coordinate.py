"""mixcache's opt-in ``extrapolate_in="step"`` (Note [step coordinate]): the step reuse
extrapolates linearly in the step number; decisions and outputs equal the independent
reference (test_mixcache.BudgetRule with its weight restated in step numbers), and the
weight differs from the default time coordinate's."""

from __future__ import annotations

import pytest

from mixcache_compile import CacheSession
from mixcache_compile.policies.calibration import load_budget
from mixcache_compile.policies.mixcache import MixCacheConfig, MixCachePolicy, _Branch
from tests.eager_reference import wan_adapter
from tests.policies.harness import drive_separate
from tests.policies.reference import Probe, Reference
from tests.policies.test_mixcache import N, SHIPPED, STEPS, BudgetRule
from tests.tiny_models import wan


class StepRule(BudgetRule):
    """BudgetRule with ``w = (i - i2) / (i2 - i1) / (1 + damping (i - i2 - 1))`` in step numbers."""

    def _w(self, branch: str, step: int) -> float:
        h = self.hist.get(branch, [])
        if len(h) < 2 or not all(f for _, f in h):
            return 0.0
        (i1, _), (i2, _) = h
        return (step - i2) / (i2 - i1) / (1 + self.damping * max(step - i2 - 1, 0))


@pytest.mark.parametrize("damping", [0.0, 0.5])
@pytest.mark.parametrize("path", SHIPPED)
def test_step_coordinate_matches_reference(path: str, damping: float) -> None:
    calib = load_budget(path)
    model, make = wan()
    session = CacheSession("mixcache", calibration=path, threshold=0.5, extrapolate_in="step", damping=damping)
    rule = StepRule(calib, 0.5, STEPS, damping=damping)
    ref = Reference(model, wan_adapter(model), watch_ranges=[(1, N - 1)], watch_attn=range(N), probe=Probe("prologue"))
    drive_separate(model, make, session, ref, rule, STEPS)
    assert not session.stats()["fallbacks"]
    assert rule.chosen == [e[2] for e in session.policy.log]
    assert "step" in rule.chosen  # a loose budget skips steps, so the weight was exercised


@pytest.mark.parametrize("path", SHIPPED)
def test_step_weight_against_time_weight(path: str) -> None:
    """Computed at steps 20 and 30 of 50, reused at 32: step numbers give (32-30)/(30-20)/(1+d);
    the time coordinate gives the timesteps' ratio, which differs on a shifted schedule."""
    by_step = MixCachePolicy(MixCacheConfig(calibration=path, extrapolate_in="step", damping=0.5))
    by_time = MixCachePolicy(MixCacheConfig(calibration=path, damping=0.5))
    for p in (by_step, by_time):
        p._total = 50
        p._branches = {"cond": _Branch([(20, True), (30, True)])}
    assert by_step.extrapolation_weight("cond", 32) == pytest.approx(0.2 / 1.5)
    t = [by_time.time(i) for i in (20, 30, 32)]
    assert by_time.extrapolation_weight("cond", 32) == pytest.approx((t[2] - t[1]) / (t[1] - t[0]) / 1.5)
    assert abs(by_step.extrapolation_weight("cond", 32) - by_time.extrapolation_weight("cond", 32)) > 1e-3


def test_bad_coordinate_is_refused() -> None:
    with pytest.raises(ValueError, match="extrapolate_in"):
        MixCacheConfig(extrapolate_in="sigma")
