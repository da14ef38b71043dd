"""Policy ``mixcache``: an error-budget hybrid of step, CFG, block and attention reuse.

MixCache (arXiv 2508.12691) mixes granularities of reuse in one run, with a context-aware
trigger, an adaptive choice of granularity, and a penalty on repeating one. This policy keeps
that frame and replaces the choice rule by a predicted-error budget (``budget.py``, Note
[error budget]): per step, predict the error each candidate reuse would add to the final
output and the FLOPs it saves, and take the affordable one that saves the most. One knob,
``threshold`` (the largest predicted rel-L1 error of the final output one step's reuse may
add): 0 never reuses, larger reuses more. ``docs/policies.md`` says which parts are the
paper's and which are ours.

Per step (decided at the step's first call, which probes the prologue):
  1. **Indicator** ``x``: the prologue probe (rel-L1 change of the timestep modulation against
     the previous step, TeaCache's), rescaled by the calibrated polynomial ``rescale``, then
     weighted by the step's **size ratio** ``(u(i) - u(i+1)) / (u(i-1) - u(i))`` when the
     calibration recorded the sampler's timesteps (``u(T) = 0``; Note [step size weight]).
  2. **Forced full**: the first ``ceil(warmup * T)`` steps and the last ``final_full``; and,
     until the **trigger** fires, every step: the trigger (the paper's context-aware start)
     fires at the first step after warm-up whose indicator ``x`` is below ``tau`` (``tau=None``:
     fires after warm-up). The paper measures the output's change; the indicator stands in for
     it so that a decision reads one value from the device (issue #10).
  3. **Candidates** (``budget.CANDIDATES``) allowed by the interference rules: ``step`` only
     while both branches' last outputs are fresh full computations (no chaining: a skipped
     step reuses or extrapolates fresh outputs only); ``cfg`` only with a difference from a
     step that computed both branches in full and on separate-branch calls (the batched CFG
     call probes first, and CFG cannot follow a probe); ``block``/``attn`` only with their
     caches recorded by full calls.
  4. **Choice**: ``budget.choose`` with the staleness of each quantity, the calibrated
     coefficients ``k`` and savings, and ``repeat_penalty`` on repeating the last set.
  5. **Step reuse extrapolates** (``extrapolate=True``) from the last two fresh outputs at
     steps ``i1 < i2``: ``eps = eps2 + w (eps2 - eps1)``, ``w = (u(i) - u(i2)) / (u(i2) -
     u(i1)) / (1 + damping (i - i2 - 1))``: first order in a time coordinate ``u``, damped for
     long skips (METHODS.md's measured table: the full linear weight is best one step ahead,
     less of it further). ``u`` is the sampler's timestep when the calibration recorded its
     schedule (``timesteps``, interpolated over the progress ``i / (T - 1)``), else the
     cumulative indicator (the sum of ``x`` up to the step: the modulation's own clock);
     ``extrapolate_in="step"`` makes ``u`` the step number (opt-in, Note [step coordinate]).
  6. **CFG rebuild**: ``eps_u = IFFT(FFT(c) + w_low low(FFT(d)) + w_high high(FFT(d)))``
     (FasterCache's frequency split; ``cfg_weights`` default (1, 1), i.e. ``c + d``).

Coefficients come from ``calibration=`` (a file written by ``mixcache calibrate
--target-psnr``, which also sets the threshold unless one is given), else from the shipped
calibration of the model the policy is bound to (``calibrations/*.json``, matched by the
weights' fingerprint, Note [calibration per model]), else ``FALLBACK`` (a conservative guess
for an uncalibrated model: block / attn / cfg priced above step reuse).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import budget
from .config import PolicyConfig, expect_config
from .frequency import rebuild_from_delta
from .base import PolicyBase
from .protocol import CFG, FULL, PROBE, STEP, Action, ActionKind, CacheNeeds, CallReport, ModelInfo, Observation, Probe
from .schedules import check_float, check_num_steps, check_positive_int, resolve_num_steps

# Note [calibration per model]: every shipped model has its own calibration, written by
# `mixcache calibrate --model NAME --target-psnr X` into calibrations/NAME.json with the
# fingerprint of the weights it was made on (fingerprint.py). ``enable`` binds the policy to
# the model (``bind_model``); the policy then loads the file whose fingerprint matches. A
# model none matches (or a policy never bound) gets FALLBACK: a calibration of one model is
# no default for another (tiny's coefficients and threshold missed the target on deep).
CALIBRATION_DIR = os.path.join(os.path.dirname(__file__), "calibrations")
# Damping of the step extrapolation when neither the config nor the calibration sets it: best
# on tiny's calibration prompts (schedule simulator, 8-13 computed steps of 50); deep's file
# carries 0.5 (best there: 28.4 dB against 27.3 with 0.25 at 8 computed steps).
DAMPING = 0.25
# Note [step coordinate]: ``extrapolate_in="step"`` extrapolates linearly in the step number
# instead of the sampler's time; with ``damping=0`` it is the fill ``v:index:0`` of
# docs/experiments/skip_fill.md. Schedule simulator, schedules re-climbed on the calibration
# prompts: deep 6 computed steps of 50, 28.26 dB held-out against 27.59 with the default
# (time, the calibration's damping), +0.41 on 12 frontier samples, +0.14 on 12 fresh ones;
# tiny 7 and 8 steps +0.4 to +2.8 on every held-out set; -0.5 to +0.05 dB on the calibration
# prompts. Opt-in: the shipped calibrations' thresholds were fitted with the default, and the
# budget's own schedules with it were not measured.
# Note [step size weight]: the probe measures how much the model's input changed since the
# previous step, which follows the previous step's size ``u(i-1) - u(i)``; what a reuse at step
# ``i`` adds to the sample is the output's error times this step's own size ``u(i) - u(i+1)``
# (the sampler moves by size x output). So the budget charges ``x`` times the ratio of the two.
# It is ~1 (1.0-1.2) on every step but the last of a flow-matching schedule, where the timestep
# drops to 0 after a large relative change: there the raw indicator is the run's largest
# (0.47 on both shipped models) while the step moves the sample by a third of the one before
# (ratio 0.33). Measured with the schedule simulator on the calibration prompts at 6 (deep)
# and 7 (tiny) computed steps of 50: +1.5 to +3 dB, mostly by extrapolating the last step
# instead of computing it (the paper's "final steps full" rule, ``final_full``, now defaults
# to 0 and is left to the budget).
# For models without a calibration: step reuse at TeaCache's scale, the partial reuses priced
# higher (METHODS.md measured CFG and block reuse losing to sparser step reuse), savings at
# typical DiT shares.
FALLBACK: dict[str, Any] = {
    "k": {"step": 1.0, "step_extrapolated": 0.5, "cfg": 1.0, "block": 1.0, "attn": 1.0},
    "savings": {"block": 0.5, "attn": 0.25},
    "rescale": [1.0, 0.0],
    "threshold": 0.05,
    "source": "fallback",
}


@dataclass(frozen=True)
class MixCacheConfig(PolicyConfig):
    """Options of ``mixcache`` (see the module docstring). ``threshold=None`` takes the
    calibration's (or the fallback's)."""

    name: ClassVar[str] = "mixcache"
    threshold: float | None = None
    calibration: str | os.PathLike[str] | None = None
    warmup: float = 0.02
    final_full: int = 0  # Note [step size weight]: the paper forces final steps; the budget decides
    tau: float | None = None
    Fn: int = 1  # noqa: N815
    Bn: int = 1  # noqa: N815
    extrapolate: bool = True
    extrapolate_in: str = "time"  # "time" (item 5's u) or "step" (Note [step coordinate])
    damping: float | None = None  # None: the calibration's, else DAMPING
    repeat_penalty: float = 1.0
    cfg_weights: tuple[float, float] = (1.0, 1.0)
    lowpass_divisor: int = 5
    candidates: tuple[str, ...] = ("step", "cfg", "block", "attn")
    num_steps: int | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None:
            check_float(self.threshold, "threshold", minimum=0.0)
        if self.calibration is not None:  # a path, stored as a string so the config is JSON data
            self._set("calibration", os.fspath(self.calibration))
        self._set("cfg_weights", tuple(self.cfg_weights))
        self._set("candidates", tuple(self.candidates) if not isinstance(self.candidates, str) else self.candidates)
        check_float(self.warmup, "warmup", 0.0, 1.0)
        check_positive_int(self.final_full, "final_full", minimum=0)
        if self.tau is not None:
            check_float(self.tau, "tau", minimum=0.0)
        check_positive_int(self.Fn, "Fn", minimum=1)
        check_positive_int(self.Bn, "Bn", minimum=0)
        if not isinstance(self.extrapolate, bool):
            raise TypeError(f"extrapolate must be a bool, got {self.extrapolate!r}")
        if self.extrapolate_in not in ("time", "step"):
            raise ValueError(f"extrapolate_in must be 'time' or 'step', got {self.extrapolate_in!r}")
        if self.damping is not None:
            check_float(self.damping, "damping", minimum=0.0)
        check_float(self.repeat_penalty, "repeat_penalty", minimum=1.0)
        if len(self.cfg_weights) != 2:
            raise ValueError(f"cfg_weights must be (w_low, w_high), got {self.cfg_weights!r}")
        check_positive_int(self.lowpass_divisor, "lowpass_divisor")
        if isinstance(self.candidates, str) or not set(self.candidates) <= set(budget.QUANTITIES) or not self.candidates:
            raise ValueError(f"candidates must be a non-empty subset of {budget.QUANTITIES}, got {self.candidates!r}")
        check_num_steps(self.num_steps)


@dataclass
class _Branch:
    computed: list[tuple[int, bool]] = field(default_factory=list)  # last two (step, was FULL) computed calls


class MixCachePolicy(PolicyBase):
    name = "mixcache"
    config_class = MixCacheConfig

    def __init__(self, config: MixCacheConfig | None = None) -> None:
        self.config = expect_config(config, MixCacheConfig)
        from .calibration import load_budget

        self._use(load_budget(self.config.calibration) if self.config.calibration is not None else dict(FALLBACK))
        self.block_range: tuple[int, int] | None = None
        self._attn_blocks: tuple[int, ...] = ()
        self.reset()

    def _use(self, calib: Mapping[str, Any]) -> None:
        self.calibration_source: str = str(calib.get("source", self.config.calibration or "fallback"))
        self.k: dict[str, float] = dict(calib["k"])
        # Note [priced out] (budget.py): a reuse the calibration prices out is no candidate at all
        self.candidates: tuple[str, ...] = tuple(q for q in self.config.candidates if self.k.get(q, 0.0) < budget.PRICED_OUT)
        self.savings: dict[str, float] = dict(calib["savings"])
        self.rescale_coefficients: list[float] = list(calib["rescale"])
        self.timesteps: list[float] | None = [float(t) for t in calib["timesteps"]] if calib.get("timesteps") else None
        self.threshold = float(self.config.threshold if self.config.threshold is not None else calib["threshold"])
        damping = self.config.damping if self.config.damping is not None else calib.get("damping", DAMPING)
        self.damping = float(damping)

    def bind_model(self, model: Any) -> None:
        """Load the shipped calibration of ``model`` (Note [calibration per model]), unless a
        calibration file was given."""
        if self.config.calibration is None:
            self._use(shipped_for(model))

    # ---- protocol -------------------------------------------------------------------------
    def reset(self) -> None:
        self._branches: dict[str, _Branch] = {}
        self._stale: dict[str, float] = {q: 0.0 for q in budget.QUANTITIES}
        self._plan_step: int | None = None
        self._plan: frozenset[str] = frozenset()
        self._clock: dict[int, float] = {}  # step -> cumulative indicator (the fallback time coordinate)
        self._total: int | None = None
        self._previous: frozenset[str] = frozenset()
        self._triggered = self.config.tau is None
        self.log: list[tuple[int, float, str, float]] = []  # (step, x, reuse, predicted error)

    def needs(self, model: ModelInfo) -> CacheNeeds:
        c = self.config
        rng = (c.Fn, model.num_blocks - c.Bn)
        self.block_range = rng if "block" in self.candidates and rng[0] < rng[1] and rng in model.reusable_ranges else None
        self._attn_blocks = tuple(range(model.num_blocks)) if "attn" in self.candidates and model.attention_reusable else ()
        return CacheNeeds(
            outputs=True,
            cfg_delta="cfg" in self.candidates,
            ranges={self.block_range} if self.block_range else set(),
            attn_blocks=set(self._attn_blocks),
            history=2,
            probe=Probe("prologue", update="always"),
        )

    def decide(self, obs: Observation) -> Action:
        if obs.step != self._plan_step:
            return PROBE  # the step's first call: plan after the indicator
        return self._action(obs.branch, obs)

    def after_probe(self, obs: Observation, indicator: float) -> Action:
        if obs.step != self._plan_step:
            self._plan_next(obs, indicator)
        return self._action(obs.branch, obs)

    def observe(self, report: CallReport) -> None:
        if report.step is None:
            return
        kind = report.action.kind
        if kind in (ActionKind.FULL, ActionKind.BLOCK, ActionKind.ATTN):
            state = self._branches.setdefault(report.branch, _Branch())
            state.computed = [*state.computed, (report.step, kind is ActionKind.FULL)][-2:]

    # ---- hooks the runtime calls ------------------------------------------------------------
    def reuse_output(self, current: list, previous: list | None, obs: Observation | None) -> list:
        w = self.extrapolation_weight(obs.branch, obs.step) if obs is not None else 0.0
        if previous is None or w == 0.0:
            return [t.clone() for t in current]
        return [c + (c - p) * w for c, p in zip(current, previous)]

    def rebuild_uncond(self, cond: Any, delta: Any, obs: Observation | None) -> Any:
        w_low, w_high = self.config.cfg_weights
        if (w_low, w_high) == (1.0, 1.0):
            return cond + delta
        return rebuild_from_delta(cond, delta, w_low, w_high, self.config.lowpass_divisor)

    # ---- the rule ---------------------------------------------------------------------------
    def rescale(self, x: float) -> float:
        value = 0.0
        for c in self.rescale_coefficients:
            value = value * x + c
        return max(value, 0.0)

    def extrapolation_weight(self, branch: str, step: int) -> float:
        """``w`` of the step reuse at ``step`` (0 without two fresh full outputs)."""
        state = self._branches.get(branch)
        if not self.config.extrapolate or state is None or len(state.computed) < 2 or not all(f for _, f in state.computed):
            return 0.0
        (i1, _), (i2, _) = state.computed
        if self.config.extrapolate_in == "step":
            u1, u2, u = float(i1), float(i2), float(step)
        else:
            u1, u2, u = self.time(i1), self.time(i2), self.time(step)
        if u1 is None or u2 is None or u is None or u2 == u1:
            return 0.0
        reach = step - i2
        return (u - u2) / (u2 - u1) / (1.0 + self.damping * max(reach - 1, 0))

    def time(self, step: int) -> float | None:
        """The time coordinate ``u`` of ``step`` (module docstring, item 5)."""
        if self.timesteps is None or self._total is None:
            return self._clock.get(step)
        table, total = self.timesteps, self._total
        pos = step / max(total - 1, 1) * (len(table) - 1)
        lo = min(int(pos), len(table) - 2)
        return table[lo] + (table[lo + 1] - table[lo]) * (pos - lo) if len(table) > 1 else table[0]

    def step_weight(self, step: int) -> float:
        """The size ratio of Note [step size weight]; 1 without the sampler's timesteps."""
        if self.timesteps is None or self._total is None or step < 1:
            return 1.0
        now, before = self.time(step), self.time(step - 1)
        after = self.time(step + 1) if step + 1 < self._total else 0.0  # the sampler ends at time 0
        if now is None or before is None or after is None or before == now:
            return 1.0
        return max((now - after) / (before - now), 0.0)

    def _warm_steps(self, total: int) -> int:
        return math.ceil(self.config.warmup * total - 1e-9)

    def _plan_next(self, obs: Observation, indicator: float) -> None:
        total = resolve_num_steps(obs.num_steps, self.config.num_steps)
        self._total = total
        x = self.rescale(indicator) if math.isfinite(indicator) else math.inf
        previous = max(self._clock.items())[1] if self._clock else 0.0
        self._clock[obs.step] = previous + (x if math.isfinite(x) else 0.0)  # the clock keeps the unweighted x
        x *= self.step_weight(obs.step)
        if not self._triggered and obs.step >= self._warm_steps(total):
            self._triggered = x < self.config.tau  # type: ignore[operator]
        forced = obs.step < self._warm_steps(total) or obs.step >= total - self.config.final_full or not self._triggered
        if forced or not math.isfinite(x):
            choice = budget.Choice(frozenset(), 0.0, 0.0)
        else:
            choice = budget.choose(self._allowed(obs), x, self._stale, self.k, self.savings, self.threshold,
                                   self._extrapolates(obs.step), self._previous, self.config.repeat_penalty)
        if math.isfinite(x):
            self._stale = budget.advance(self._stale, choice.reuse, x)
        else:
            self._stale = {q: 0.0 for q in budget.QUANTITIES}
        self._plan_step, self._plan = obs.step, choice.reuse
        self._previous = choice.reuse
        self.log.append((obs.step, x, "+".join(q for q in budget.QUANTITIES if q in choice.reuse) or "full", choice.error))

    def _extrapolates(self, step: int) -> bool:
        return bool(self._branches) and all(self.extrapolation_weight(b, step) > 0 for b in self._branches)

    def _allowed(self, obs: Observation) -> list[frozenset[str]]:
        """Candidates the interference rules allow (Note [no chaining])."""
        c, branches = self.candidates, self._branches
        # Note [no chaining]: step, block and attention reuse read caches that the branches'
        # last computing calls recorded; those calls must have been full (not themselves
        # approximated). The CFG difference must come from a step computing both in full.
        clean = bool(branches) and all(s.computed and s.computed[-1][1] for s in branches.values())
        ok = {
            "step": "step" in c and clean,
            "cfg": "cfg" in c and obs.branch == "cond" and obs.exact("delta"),  # the runtime's stamp
            "block": self.block_range is not None and clean,
            "attn": bool(self._attn_blocks) and clean,
        }
        return [s for s in budget.CANDIDATES if all(ok[q] for q in s)]

    def _action(self, branch: str, obs: Observation) -> Action:
        plan = self._plan
        if obs.step != self._plan_step or not plan:
            return FULL
        if "step" in plan:
            return STEP
        if "cfg" in plan and branch == "uncond":
            return CFG if "cond" in obs.computed_this_step else FULL
        if "block" in plan and self.block_range is not None:
            return Action(ActionKind.BLOCK, block_range=self.block_range)
        if "attn" in plan and self._attn_blocks:
            return Action(ActionKind.ATTN, attn_blocks=self._attn_blocks)
        return FULL


def shipped_calibrations() -> dict[str, str]:
    """``{fingerprint: path}`` of the calibrations shipped in ``CALIBRATION_DIR``."""
    import json

    found = {}
    if os.path.isdir(CALIBRATION_DIR):
        for name in sorted(os.listdir(CALIBRATION_DIR)):
            if name.endswith(".json"):
                path = os.path.join(CALIBRATION_DIR, name)
                with open(path) as f:
                    key = json.load(f).get("fingerprint")
                if key:
                    found[key] = path
    return found


def shipped_for(model: Any) -> dict[str, Any]:
    """The shipped calibration of ``model`` (matched by fingerprint), else ``FALLBACK``."""
    from .calibration import load_budget
    from .fingerprint import fingerprint

    path = shipped_calibrations().get(fingerprint(model))
    if path is None:
        return dict(FALLBACK)
    return {**load_budget(path), "source": path}
