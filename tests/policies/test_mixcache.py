"""mixcache (error-budget controller): decisions and outputs equal an independent eager
reference call by call, with every shipped calibration's defaults, with the uncalibrated
fallback (the indicator's clock as time) and with a calibration that makes every candidate
affordable; compute is monotone in ``threshold``; calibration files round-trip; each shipped
model gets its own calibration, any other model the fallback."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mixcache_compile import CacheSession
from mixcache_compile.policies.calibration import BUDGET_FORMAT, load_budget, save
from mixcache_compile.policies.mixcache import CALIBRATION_DIR, FALLBACK, MixCacheConfig, MixCachePolicy
from tests.eager_reference import wan_adapter
from tests.policies.harness import compile_model, drive_separate
from tests.policies.reference import Probe, Reference
from tests.tiny_models import wan

STEPS = 16
N = 3  # tiny Wan blocks: the block candidate skips block 1 (Fn = Bn = 1)
ALL = "attn:0,1,2"
ORDER = ("step", "cfg+block", "cfg+attn", "cfg", "block", "attn")  # the docstring's candidate order
SHIPPED = sorted(str(p) for p in __import__("pathlib").Path(CALIBRATION_DIR).glob("*.json"))


class BudgetRule:
    """The controller restated from the docstrings of policies/mixcache.py and budget.py."""

    def __init__(self, calib: dict, threshold: float, steps: int, warmup: float = 0.02, final: int = 0, damping: float | None = None) -> None:
        self.k, self.sav, self.poly = calib["k"], calib["savings"], calib["rescale"]
        self.table = calib.get("timesteps") or None  # the sampler's timesteps at calibration
        self.clock: list[float] = []  # cumulative rescaled indicator per step (no table)
        self.thr, self.T, self.final = threshold, steps, final
        self.damping = damping if damping is not None else calib.get("damping", 0.25)  # the file's, else 0.25
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
        u1, u2, u = self._u(i1), self._u(i2), self._u(step)
        return (u - u2) / (u2 - u1) / (1 + self.damping * max(step - i2 - 1, 0))

    def _u(self, step: int) -> float:
        """Time of a step: the calibration's timesteps at progress step / (T - 1), linearly
        interpolated; without them the sum of the indicators up to the step."""
        if self.table is None:
            return self.clock[step]
        pos = step / (self.T - 1) * (len(self.table) - 1)
        lo = min(int(pos), len(self.table) - 2)
        return self.table[lo] + (self.table[lo + 1] - self.table[lo]) * (pos - lo)

    def _size_ratio(self, step: int) -> float:
        """With a timesteps table the indicator is charged times this step's size over the
        previous step's, the sampler ending at time 0; 1 at step 0 and without a table."""
        if self.table is None or step == 0:
            return 1.0
        nxt = self._u(step + 1) if step + 1 < self.T else 0.0
        return max((self._u(step) - nxt) / (self._u(step - 1) - self._u(step)), 0.0)

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
        self.clock.append((self.clock[-1] if self.clock else 0.0) + (x if math.isfinite(x) else 0.0))
        x *= self._size_ratio(step)  # the clock sums the plain x; the budget the charged one
        clean = bool(self.hist) and all(h[-1][1] for h in self.hist.values())
        ok = {"step": clean, "cfg": branch == "cond" and self.delta_full, "block": clean, "attn": clean}
        # a coefficient of 1e3 or more prices the reuse out: never a candidate (Note [priced out])
        ok = {q: allowed and self.k[q] < 1e3 for q, allowed in ok.items()}
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
        def value(last, prev):  # evaluated after this step's probe (the clock then has the step)
            w = self._w(branch, step)
            return last.clone() if prev is None or w == 0 else last + (last - prev) * w
        return value


def _drive(calib: dict, rule_threshold: float, **session_options):
    model, make = wan()
    session = CacheSession("mixcache", **session_options)
    rule = BudgetRule(calib, rule_threshold, STEPS, final=session_options.get("final_full", 0))
    ref = Reference(model, wan_adapter(model), watch_ranges=[(1, N - 1)], watch_attn=range(N), probe=Probe("prologue"))
    log = drive_separate(model, make, session, ref, rule, STEPS)
    assert not session.stats()["fallbacks"]
    return session, rule, log


@pytest.mark.parametrize("threshold", [None, 0.2])
@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_defaults_match_reference(path, threshold):
    """Each shipped calibration's coefficients, time table and threshold (or a looser
    threshold), with every other option at its default, as a user of that model gets them."""
    calib = load_budget(path)
    options = {"calibration": path} if threshold is None else {"calibration": path, "threshold": threshold}
    session, rule, log = _drive(calib, calib["threshold"] if threshold is None else threshold, **options)
    assert rule.chosen == [e[2] for e in session.policy.log]
    if threshold is not None:  # a loose budget reuses, and extrapolates
        assert "step" in rule.chosen


@pytest.mark.parametrize("path", SHIPPED)
def test_final_full_still_forces_the_last_steps(path):
    """``final_full`` (the paper's final steps, default 0 now) still forces them when set."""
    calib = load_budget(path)
    session, rule, log = _drive(calib, 0.5, calibration=path, threshold=0.5, final_full=2)
    assert rule.chosen == [e[2] for e in session.policy.log]
    assert rule.chosen[-2:] == ["full", "full"] and "step" in rule.chosen


@pytest.mark.parametrize("path", SHIPPED)
def test_step_size_ratio_discounts_only_the_last_step(path):
    """With the sampler's timesteps the indicator is charged times this step's size over the
    previous one's: about 1 in the run, about a third on the last step of the shipped
    flow-matching schedule (which ends at time 0)."""
    policy = MixCachePolicy(MixCacheConfig(calibration=path))
    policy._total = 50
    t = policy.timesteps + [0.0]
    ratios = [policy.step_weight(i) for i in range(50)]
    assert ratios[0] == 1.0
    assert ratios[49] == pytest.approx(t[49] / (t[48] - t[49])) and ratios[49] < 0.5
    assert all(0.9 < r < 1.3 for r in ratios[1:49]), ratios
    assert MixCachePolicy(MixCacheConfig()).step_weight(49) == 1.0  # no timesteps: no weight


def test_uncalibrated_fallback_matches_reference():
    """A model without a calibration: FALLBACK, and the indicator's clock as the time of the
    extrapolation (no timesteps table)."""
    session, rule, log = _drive(dict(FALLBACK), 0.2, threshold=0.2)
    assert session.policy.calibration_source == "fallback" and session.policy.timesteps is None
    assert rule.chosen == [e[2] for e in session.policy.log]
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


def _fractions(thresholds: tuple[float, ...], steps: int = 12) -> list[float]:
    """Computed fraction of one 12-step generation per threshold. One compile serves them
    all (Dynamo tracing is most of this test's time): between generations only the policy's
    ``threshold`` changes, the option every decision reads."""
    model, make = wan()
    session = CacheSession("mixcache", threshold=thresholds[0])
    compiled = compile_model(model, session, repeated_blocks=["WanTransformerBlock"])
    inputs = {"cond": make(1, seed=1), "uncond": make(1, seed=2)}
    fractions = []
    for threshold in thresholds:
        session.policy.threshold = threshold
        session.reset()
        session.reset_stats()
        latent = make(1, seed=3)["hidden_states"]
        with torch.no_grad():
            for i in range(steps):
                t = torch.tensor([999.0 * (1 - i / steps)])
                outs = {}
                for branch in ("cond", "uncond"):
                    with session.context(branch, step_index=i, num_inference_steps=steps):
                        outs[branch] = compiled(**{**inputs[branch], "hidden_states": latent, "timestep": t})[0]
                latent = latent - (outs["uncond"] + 4.0 * (outs["cond"] - outs["uncond"])) / steps
        fractions.append(session.stats()["computed_fraction"])
    return fractions


def test_compute_is_monotone_in_threshold():
    fractions = _fractions((0.0, 0.05, 0.2, 1.0, 5.0))
    assert fractions[0] >= 1.0 - 1e-9  # 0 never reuses
    assert all(a >= b - 1e-9 for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[-1] < 0.7, fractions
    # the same threshold in a fresh session decides the same (one compile did not carry state over)
    assert _fractions((0.2,)) == [fractions[2]]


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


def test_each_shipped_model_gets_its_own_calibration():
    """``enable`` binds the policy to the model: each shipped model loads the calibration
    made on its weights (matched by fingerprint); changed weights get the fallback."""
    import mixcache_compile
    from mixcache_compile.zoo import MODELS, load_pipeline

    seen = set()
    for name in MODELS:
        pipe = load_pipeline(name=name)
        session = mixcache_compile.enable(pipe, policy="mixcache", engine="eager")
        policy = session.policy
        assert policy.calibration_source == str(__import__("pathlib").Path(CALIBRATION_DIR) / f"{name}.json")
        calib = load_budget(policy.calibration_source)
        assert policy.threshold == calib["threshold"] and policy.k == calib["k"] and policy.timesteps == calib["timesteps"]
        seen.add(policy.calibration_source)
    assert len(seen) == len(MODELS)
    pipe = load_pipeline(name="tiny")
    with torch.no_grad():
        next(pipe.transformer.parameters()).mul_(1.01)  # a fine-tune of tiny is not tiny
    session = mixcache_compile.enable(pipe, policy="mixcache", engine="eager")
    assert session.policy.calibration_source == "fallback" and session.policy.threshold == FALLBACK["threshold"]
    own = mixcache_compile.enable(load_pipeline(name="tiny"), policy="mixcache", engine="eager", calibration=SHIPPED[-1])
    assert own.policy.calibration_source == SHIPPED[-1]  # an explicit file wins


def test_priced_out_reuses_are_no_candidates_and_cut_no_graphs(tmp_path):
    """Note [priced out]: a partial reuse the calibration prices out (k = PRICED_OUT) is never
    chosen, even where k * x alone would allow it (an indicator below threshold / 1000), and
    the policy asks for none of its cuts: the shipped models run 2 stage graphs, not 7 / 11."""
    import mixcache_compile
    from mixcache_compile.policies.budget import PRICED_OUT
    from mixcache_compile.zoo import default_call_kwargs, load_pipeline

    # cfg priced out while step reuse is priced out too, and a threshold so loose that
    # PRICED_OUT * x passes: the old rule took step reuse here, the note's rule never does
    calib = {"format": BUDGET_FORMAT, "k": {"step": PRICED_OUT, "step_extrapolated": PRICED_OUT, "cfg": PRICED_OUT,
                                            "block": 0.3, "attn": PRICED_OUT},
             "savings": {"block": 0.3, "attn": 0.2}, "rescale": [1.0, 0.0], "threshold": 1e6}
    path = tmp_path / "calib.json"
    save(calib, path)
    session, rule, log = _drive(calib, 1e6, calibration=str(path))
    assert rule.chosen == [e[2] for e in session.policy.log]
    assert session.policy.candidates == ("block",)
    assert set(rule.chosen) == {"full", "block"}, rule.chosen  # loose enough for all, priced out none taken

    for name in ("tiny", "deep"):
        pipe = load_pipeline(name=name)
        pipe.set_progress_bar_config(disable=True)
        session = mixcache_compile.enable(pipe, engine="eager")
        assert session.policy.candidates == ("step",)  # both calibrations price cfg, block and attn out
        with torch.no_grad():
            pipe(prompt="blue square moving down", generator=torch.Generator().manual_seed(1000),
                 **default_call_kwargs(num_inference_steps=8))
        assert session.stats()["stages"] == 2  # the probe head and the rest, in one graph each
    fallback = MixCachePolicy(MixCacheConfig())
    assert fallback.candidates == ("step", "cfg", "block", "attn")  # nothing priced out without a calibration
