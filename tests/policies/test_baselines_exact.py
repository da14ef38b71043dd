"""pab, fbcache/dbcache and teacache equal an independent eager reference, call by call, on tiny
Wan (separate CFG) and tiny CogVideoX (batched CFG): same action, same output (1e-5), same
probe indicator."""

from __future__ import annotations

import pytest

from mixcache_compile import CacheSession
from tests.eager_reference import two_stream_adapter, wan_adapter
from tests.policies.harness import drive_batched, drive_separate
from tests.policies.reference import Probe, Reference
from tests.tiny_models import cogvideox, wan

STEPS = 12
N = 3  # blocks of the tiny models


def _models(kind: str):
    if kind == "wan":
        model, make = wan()
        return model, make, wan_adapter(model), drive_separate, {}
    model, make = cogvideox()
    return model, make, two_stream_adapter(model), drive_batched, {"cfg": "batched"}


# ---- PAB: written from the paper's rule, not from the policy -------------------------------------
class PABRule:
    def __init__(self, interval: int, lo: float, hi: float, steps: int) -> None:
        window = [i for i in range(steps) if lo * steps <= i < hi * steps]
        self.reuse = {i for i in window if (i - window[0]) % interval}

    def action(self, step, branch, computed):
        return "attn:0,1,2" if step in self.reuse else "full"


@pytest.mark.parametrize("kind", ["wan", "cogvideox"])
def test_pab_matches_reference(kind):
    model, make, adapter, drive, cfg = _models(kind)
    session = CacheSession("pab", interval=3, window=(0.25, 0.9), **cfg)
    ref = Reference(model, adapter, watch_attn=range(N))
    log = drive(model, make, session, ref, PABRule(3, 0.25, 0.9, STEPS), STEPS)
    actions = [a for _, _, a in log]
    assert actions.count("attn:0,1,2") >= 4 and actions.count("full") >= 4


# ---- FBCache / DBCache ------------------------------------------------------------------------------
class FirstBlockRule:
    """Compute the first Fn blocks; skip [Fn, N-Bn) while their residual moved less than the
    threshold since the last computed call of this branch (after warm-up)."""

    def __init__(self, threshold: float, fn: int, bn: int, warmup: int) -> None:
        self.threshold, self.fn, self.bn, self.warmup = threshold, fn, bn, warmup
        self.indicators: list[float] = []

    def action(self, step, branch, computed):
        return "probe"

    def after_probe(self, step, branch, indicator):
        self.indicators.append(indicator)
        if step >= self.warmup and indicator < self.threshold:
            return f"block:{self.fn}-{N - self.bn}"
        return "full"


@pytest.mark.parametrize("kind,policy,fn,bn,threshold", [
    ("wan", "fbcache", 1, 0, 0.25),
    ("cogvideox", "dbcache", 1, 1, 0.25),
])
def test_first_block_caches_match_reference(kind, policy, fn, bn, threshold):
    model, make, adapter, drive, cfg = _models(kind)
    session = CacheSession(policy, threshold=threshold, Fn=fn, Bn=bn, warmup=2, **cfg)
    ref = Reference(model, adapter, watch_ranges=[(fn, N - bn)], probe=Probe("blocks", fn, "on_compute"))
    rule = FirstBlockRule(threshold, fn, bn, warmup=2)
    log = drive(model, make, session, ref, rule, STEPS)
    actions = [a for _, _, a in log]
    assert actions.count(f"block:{fn}-{N - bn}") >= 2 and actions.count("full") >= 3, (actions, rule.indicators)


# ---- TeaCache -----------------------------------------------------------------------------------------
class TeaRule:
    """Accumulate f(rel-L1 change of the block-0 time modulation); skip the call while the sum
    stays under the threshold; first `warmup` and last `final` steps compute."""

    def __init__(self, threshold: float, coefficients, warmup: int, final: int, steps: int) -> None:
        self.threshold, self.coefficients = threshold, coefficients
        self.warmup, self.final, self.steps = warmup, final, steps
        self.acc: dict[str, float] = {}
        self.indicators: list[float] = []

    def f(self, x: float) -> float:
        if self.coefficients is None:
            return x
        degree = len(self.coefficients) - 1
        return sum(c * x ** (degree - k) for k, c in enumerate(self.coefficients))

    def action(self, step, branch, computed):
        return "probe"

    def after_probe(self, step, branch, indicator):
        self.indicators.append(indicator)
        if step < self.warmup or step >= self.steps - self.final or indicator == float("inf"):
            self.acc[branch] = 0.0
            return "full"
        self.acc[branch] = self.acc.get(branch, 0.0) + self.f(indicator)
        if self.acc[branch] < self.threshold:
            return "step"
        self.acc[branch] = 0.0
        return "full"


@pytest.mark.parametrize("kind,threshold,coefficients", [
    ("wan", 0.3, None),
    ("cogvideox", 0.5, (0.2, 0.3, 0.0)),
])
def test_teacache_matches_reference(kind, threshold, coefficients):
    model, make, adapter, drive, cfg = _models(kind)
    session = CacheSession("teacache", threshold=threshold, coefficients=coefficients, **cfg)
    ref = Reference(model, adapter, probe=Probe("prologue", update="always"))
    rule = TeaRule(threshold, coefficients, warmup=1, final=1, steps=STEPS)
    log = drive(model, make, session, ref, rule, STEPS)
    actions = [a for _, _, a in log]
    assert actions.count("step") >= 2 and actions.count("full") >= 4, (actions, rule.indicators)


def test_options_are_validated_with_their_names():
    from mixcache_compile.policies import make_policy

    with pytest.raises(ValueError, match="threshold"):
        make_policy("fbcache", threshold=-1)
    with pytest.raises(ValueError, match="interval"):
        make_policy("pab", interval=1)
    with pytest.raises(TypeError, match="coefficients"):
        make_policy("teacache", coefficients="1,2")
    with pytest.raises(ValueError, match="window"):
        make_policy("pab", window=(0.5, 0.2))
    policy = make_policy("dbcache", Fn=2, Bn=2)
    from mixcache_compile.policies.protocol import ModelInfo

    with pytest.raises(ValueError, match="Fn=2 and Bn=2"):
        policy.needs(ModelInfo(3, ((0, 3),), frozenset(), True, False))
