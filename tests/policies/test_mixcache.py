"""mixcache (error-budget controller): decisions and outputs equal an independent eager
reference call by call, with the shipped defaults and with a calibration that makes every
candidate affordable; compute is monotone in ``threshold``; calibration files round-trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mixcache_compile import CacheSession
from mixcache_compile.policies.calibration import BUDGET_FORMAT, load_budget, save
from mixcache_compile.policies.mixcache import FALLBACK, MixCacheConfig, MixCachePolicy, _shipped
from tests.eager_reference import wan_adapter
from tests.policies.harness import compile_model, drive_separate
from tests.policies.reference import Probe, Reference
from tests.tiny_models import wan

STEPS = 16
N = 3  # tiny Wan blocks: the block candidate skips block 1 (Fn = Bn = 1)
ALL = "attn:0,1,2"
ORDER = ("step", "cfg+block", "cfg+attn", "cfg", "block", "attn")  # the docstring's candidate order


class BudgetRule:
    """The controller restated from the docstrings of policies/mixcache.py and budget.py."""

    def __init__(self, calib: dict, threshold: float, steps: int, warmup: float = 0.04, final: int = 1, damping: float = 0.5) -> None:
        self.k, self.sav, self.poly = calib["k"], calib["savings"], calib["rescale"]
        self.thr, self.T, self.final, self.damping = threshold, steps, final, damping
        self.warm = math.ceil(warmup * steps - 1e-9)
        self.hist: dict[str, list[tuple[int, bool]]] = {}  # branch -> last two computed (step, full)
        self.delta_full = False
        self.stale = {q: 0.0 for q in ("step", "cfg", "block", "attn")}
        self.plan: tuple[int, str] | None = None
        self.prev = "full"
        self.kinds: dict[int, dict[str, str]] = {}
        self.chosen: list[str] = []

    def _w(self, branch: str, step: int) -> float:
        h = self.hist.get(branch, [])
        if len(h) < 2 or not all(f for _, f in h):
            return 0.0
        (i1, _), (i2, _) = h
        reach = step - i2
        return reach / (i2 - i1) / (1 + self.damping * max(reach - 1, 0))

    def _error(self, cand: str, x: float, extrap: bool) -> float:
        total = 0.0
        for q in cand.split("+"):
            k = self.k["step_extrapolated"] if (q == "step" and extrap) else self.k[q]
            total += k * (self.stale[q] + x)
        return total * (1.0 if cand != self.prev else 1.0)  # repeat penalty 1 (default)

    def _saving(self, cand: str) -> float:
        if cand == "step":
            return 1.0
        parts = cand.split("+")
        half = 0.5 if "cfg" in parts else 1.0
        return (0.5 if "cfg" in parts else 0.0) + sum(self.sav[p] * half for p in parts if p in ("block", "attn"))

    def after_probe(self, step, branch, indicator):
        x = sum(c * indicator ** (len(self.poly) - 1 - i) for i, c in enumerate(self.poly)) if math.isfinite(indicator) else math.inf
        x = max(x, 0.0)
        clean = bool(self.hist) and all(h[-1][1] for h in self.hist.values())
        ok = {"step": clean, "cfg": branch == "cond" and self.delta_full, "block": clean, "attn": clean}
        best, best_err, best_sav = "full", 0.0, 0.0
        if self.warm <= step < self.T - self.final and math.isfinite(x):
            extrap = bool(self.hist) and all(self._w(b, step) > 0 for b in self.hist)
            for cand in ORDER:
                if not all(ok[q] for q in cand.split("+")):
                    continue
                err, sav = self._error(cand, x, extrap), self._saving(cand)
                if err <= self.thr and (sav > best_sav + 1e-12 or (abs(sav - best_sav) <= 1e-12 and best != "full" and err < best_err)):
                    best, best_err, best_sav = cand, err, sav
        if math.isfinite(x):
            parts = set(best.split("+")) - {"full"}
            aged = set(parts)
            if "step" in parts:
                aged |= set(self.stale)
            if "cfg" in parts:
                aged |= {"step", "block", "attn"}
            self.stale = {q: (v + x if q in aged else 0.0) for q, v in self.stale.items()}
        else:
            self.stale = dict.fromkeys(self.stale, 0.0)
        self.plan, self.prev = (step, best), best
        self.chosen.append(best)
        return self._for(branch, best, frozenset())

    def _for(self, branch: str, plan: str, computed) -> str:
        if plan == "step":
            return "step"
        if "cfg" in plan and branch == "uncond":
            return "cfg" if "cond" in computed else "full"
        if "block" in plan:
            return f"block:1-{N - 1}"
        if "attn" in plan:
            return ALL
        return "full"

    def action(self, step, branch, computed):
        if self.plan is None or self.plan[0] != step:
            return "probe"
        return self._for(branch, self.plan[1], computed)

    def observe(self, step, branch, result):
        kind = result.action
        self.kinds.setdefault(step, {})[branch] = kind
        if kind not in ("step", "cfg"):
            self.hist[branch] = (self.hist.get(branch, []) + [(step, kind == "full")])[-2:]
        done = self.kinds[step]
        if branch == "uncond" and done.get("cond") not in (None, "step", "cfg") and kind not in ("step", "cfg"):
            self.delta_full = all(k == "full" for k in done.values())

    def step_value(self, step, branch):
        w = self._w(branch, step)
        return lambda last, prev: last.clone() if prev is None or w == 0 else last + (last - prev) * w


def _drive(calib: dict, rule_threshold: float, **session_options):
    model, make = wan()
    session = CacheSession("mixcache", **session_options)
    rule = BudgetRule(calib, rule_threshold, STEPS)
    ref = Reference(model, wan_adapter(model), watch_ranges=[(1, N - 1)], watch_attn=range(N), probe=Probe("prologue"))
    log = drive_separate(model, make, session, ref, rule, STEPS)
    assert not session.stats()["fallbacks"]
    return session, rule, log


@pytest.mark.parametrize("threshold", [None, 0.2])
def test_shipped_defaults_match_reference(threshold):
    """The shipped coefficients and threshold (or a looser threshold), as a user gets them."""
    calib = _shipped()
    options = {} if threshold is None else {"threshold": threshold}
    session, rule, log = _drive(calib, calib["threshold"] if threshold is None else threshold, **options)
    assert rule.chosen == [e[2] for e in session.policy.log]
    if threshold is not None:  # a loose budget reuses, and extrapolates
        assert "step" in rule.chosen


def test_every_candidate_matches_reference(tmp_path):
    """A calibration pricing the step reuse out: the controller spends the budget on the
    partial reuses and their combinations, each run exactly as the reference runs it."""
    calib = {"format": BUDGET_FORMAT, "k": {"step": 50.0, "step_extrapolated": 50.0, "cfg": 0.2, "block": 0.3, "attn": 0.25},
             "savings": {"block": 0.3, "attn": 0.2}, "rescale": [1.0, 0.0], "threshold": 0.5}
    path = tmp_path / "calib.json"
    save(calib, path)
    session, rule, log = _drive(calib, 0.5, calibration=str(path))
    kinds = {a.split(":")[0] for _, _, a in log}
    assert {"cfg", "block"} <= kinds, kinds
    assert any("+" in c for c in rule.chosen), rule.chosen


def _fraction(threshold: float, steps: int = 12) -> float:
    model, make = wan()
    session = CacheSession("mixcache", threshold=threshold)
    compiled = compile_model(model, session, repeated_blocks=["WanTransformerBlock"])
    inputs = {"cond": make(1, seed=1), "uncond": make(1, seed=2)}
    latent = make(1, seed=3)["hidden_states"]
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([999.0 * (1 - i / steps)])
            outs = {}
            for branch in ("cond", "uncond"):
                with session.context(branch, step_index=i, num_inference_steps=steps):
                    outs[branch] = compiled(**{**inputs[branch], "hidden_states": latent, "timestep": t})[0]
            latent = latent - (outs["uncond"] + 4.0 * (outs["cond"] - outs["uncond"])) / steps
    return session.stats()["computed_fraction"]


def test_compute_is_monotone_in_threshold():
    fractions = [_fraction(t) for t in (0.0, 0.05, 0.2, 1.0, 5.0)]
    assert fractions[0] >= 1.0 - 1e-9  # 0 never reuses
    assert all(a >= b - 1e-9 for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[-1] < 0.7, fractions


def test_calibration_round_trips_and_bad_files_say_why(tmp_path):
    calib = {"format": BUDGET_FORMAT, "k": dict(FALLBACK["k"]), "savings": dict(FALLBACK["savings"]),
             "rescale": [2.0, 0.5], "threshold": 0.03, "target_psnr": 32.0}
    path = tmp_path / "c.json"
    save(calib, path)
    loaded = load_budget(path)
    assert loaded["k"] == calib["k"] and loaded["savings"] == calib["savings"] and loaded["threshold"] == 0.03
    policy = MixCachePolicy(MixCacheConfig(calibration=str(path)))
    assert policy.threshold == 0.03 and policy.rescale(0.1) == pytest.approx(0.7) and policy.k == calib["k"]
    assert MixCachePolicy(MixCacheConfig(calibration=str(path), threshold=0.5)).threshold == 0.5
    for broken, message in (({**calib, "format": 1}, "not a mixcache budget"), ({**calib, "k": {"step": 1.0}}, "'k' must map"),
                            ({**calib, "savings": {"block": 2.0, "attn": 0.1}}, "savings"), ({**calib, "threshold": -1}, "threshold")):
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            load_budget(path)
    with pytest.raises(FileNotFoundError):
        load_budget(tmp_path / "missing.json")


def test_config_validates():
    with pytest.raises(ValueError):
        MixCacheConfig(threshold=-0.1)
    with pytest.raises(ValueError):
        MixCacheConfig(candidates=("step", "tokens"))
    with pytest.raises(TypeError, match="unknown option"):
        CacheSession("mixcache", tau_typo=1.0)
