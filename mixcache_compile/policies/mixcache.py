"""Policy ``mixcache``: step, CFG and block caching mixed in one run (MixCache, arXiv 2508.12691).

The public record gives the ingredients (three granularities, an interference analysis, a
context-aware trigger, an adaptive hybrid decision, a score ``P(g) = D(g) * I(g)`` with a 5x
penalty on repeating a granularity, an adaptive interval with thresholds ``delta1 < delta2``).
Everything below that goes beyond those words is a **reconstruction**; every constant is a
knob.

Granularities ``g`` and what they reuse (per branch; cond and uncond never share a cache):
  ``step``  skip the call, reuse the branch's last output (``STEP``);
  ``cfg``   compute cond only, rebuild uncond as ``eps_c + delta`` (``CFG``);
  ``block`` compute the first ``Fn`` and last ``Bn`` blocks, reuse the residual of blocks
            ``[Fn, N - Bn)`` (``BLOCK``).

Decision, once per step (at its first call), in this order:
  1. **Warm-up**: steps ``i < ceil(warmup * T)`` compute in full; so do the last
     ``final_full`` steps.
  2. **Trigger** (per branch, latched): a branch may be approximated once, after warm-up, the
     rel-L1 change of its output between its last two *fresh* outputs is below ``tau``.
     A granularity is a candidate only if every branch it approximates has triggered
     (``step``, ``block``: all branches; ``cfg``: the uncond / batch branch).
  3. **Interval**: after ``interval`` consecutive cached steps the next step computes in full
     (a *refresh*).
  4. **Interference rules**: one granularity per step (the cond call of a ``cfg`` step computes
     in full); after a ``step`` reuse the next step is ``cfg`` or full (the cond branch is
     always fresh again); nothing reuses an approximated tensor: ``step`` needs every branch's
     last recorded output to come from a full call (not a block-skipped or rebuilt one),
     ``cfg`` needs the stored difference to come from a step where both branches computed in
     full, ``block`` residuals are only recorded by full calls.
  5. **Score**: ``P(g) = D(g) * I(g)``, times ``repeat_penalty`` (5) if ``g`` is the
     granularity of the last cached step. ``D(g)`` is the rel-L1 between the last two fresh
     copies of what ``g`` reuses (output / CFG difference / block residual, max over
     branches), reported by the runtime after computed calls (``deviations=True``) and kept
     only when both copies were fresh. ``I(g)`` is the sensitivity (``calibration.py``),
     normalised to a maximum of 1. The smallest score wins; a granularity without two fresh
     copies yet is not a candidate; with no candidate the step computes.
  6. **Adaptive interval**: at a refresh, the fresh values are compared with what the
     finished run reused: ``e = max over g used in the run of D_refresh(g) * I(g)`` (the
     deviations reported at the refresh step). ``e > delta2`` shortens ``interval`` by one
     (not below ``min_interval``), ``e < delta1`` lengthens it (not above ``max_interval``).
  7. **Block probe**: when the model allows it, every computed call probes the first ``Fn``
     blocks (the FBCache indicator, rel-L1 of their residual against the branch's last
     computed call, ``update="always"``). A ``block`` call whose indicator exceeds
     ``block_guard`` computes in full instead (``None``: no probe, no guard).

Defaults: ``warmup=0.2`` (METHODS.md), ``final_full=2``, ``tau=0.05``, ``Fn=Bn=1``,
``interval=2`` in ``[1, 4]``, ``delta1=0.02``, ``delta2=0.06``, ``block_guard=0.15``,
``repeat_penalty=5``. The thresholds were set from the rel-L1 scales measured on the shipped
tiny text-to-video model at 50 steps (output ~0.02/step, block residual ~0.04/step, CFG
difference ~0.1/step); they are knobs, not findings. ``DEFAULT_SENSITIVITIES`` were measured
on that model with ``calibration.calibrate(mode="reuse")`` (see below) and serve uncalibrated
models; pass ``sensitivities={...}`` or ``calibration="file.json"`` for yours.

``self.log`` keeps one entry per planned step (granularity, scores, interval) for inspection.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .config import PolicyConfig, expect_config
from .protocol import CFG, FULL, PROBE, STEP, Action, ActionKind, CacheNeeds, CallReport, ModelInfo, Observation, Probe
from .schedules import check_float, check_num_steps, check_positive_int, resolve_num_steps

GRANULARITIES = ("step", "cfg", "block")

# Measured on the shipped tiny T2V model (mixcache_compile.zoo) with
# `mixcache calibrate --mode reuse --seeds 0 1 2` (30 steps, guidance 5, perturbation at 30/50/70 %
# of the steps); normalised to a maximum of 1. Raw I (final rel-L1 per unit rel-L1 of the reused
# tensor): step 0.0248, cfg 0.00288, block 0.00991. The Gaussian mode (METHODS.md's wording)
# gives step 0.0275, cfg 0.00038, block 0.0116 on the same model (likely because later steps wash
# out white noise but not the smooth error of a stale difference); single-granularity end-to-end
# runs show CFG reuse doing real damage there (docs/policies.md), hence the reuse-mode defaults.
DEFAULT_SENSITIVITIES: dict[str, float] = {"step": 1.0, "cfg": 0.116, "block": 0.400}


@dataclass
class _Branch:
    """What the policy knows about one branch's cached values."""

    out_fresh: bool = False  # the runtime's last recorded output came from a full call
    residual: bool = False  # a block residual has been recorded (always by a full call)
    triggered: bool = False
    d_step: float | None = None
    d_block: float | None = None


@dataclass
class StepDecision:
    step: int
    granularity: str | None
    scores: dict[str, float] = field(default_factory=dict)
    interval: int = 0


@dataclass(frozen=True)
class MixCacheConfig(PolicyConfig):
    """Options of ``mixcache`` (see the module docstring for what each does and the defaults' sources)."""

    name: ClassVar[str] = "mixcache"
    warmup: float = 0.2  # fraction of the steps that always compute, in [0, 1]
    final_full: int = 2  # the last steps always compute (>= 0)
    tau: float = 0.05  # trigger: a branch may be approximated once its output changes less than this
    Fn: int = 1  # noqa: N815 -- blocks computed first on a ``block`` step (>= 1)
    Bn: int = 1  # noqa: N815 -- blocks computed last on a ``block`` step (>= 0)
    sensitivities: Mapping[str, float] | None = None  # I(g) per granularity (None: shipped defaults)
    calibration: str | os.PathLike[str] | None = None  # a calibration JSON to read I(g) from instead
    repeat_penalty: float = 5.0  # score factor on repeating the last cached granularity (>= 1)
    interval: int = 2  # initial number of consecutive cached steps before a refresh
    min_interval: int = 1  # the adaptive interval's lower bound
    max_interval: int = 4  # the adaptive interval's upper bound
    delta1: float = 0.02  # refresh error below this lengthens the interval
    delta2: float = 0.06  # refresh error above this shortens the interval (>= delta1)
    block_guard: float | None = 0.15  # a block step whose probe exceeds this computes (None: no probe)
    granularities: Sequence[str] = GRANULARITIES  # which of step, cfg, block may be used
    num_steps: int | None = None  # step count when the runtime does not know it (None: 50)

    def __post_init__(self) -> None:
        self._set("warmup", check_float(self.warmup, "warmup", 0.0, 1.0))
        check_positive_int(self.final_full, "final_full", minimum=0)
        self._set("tau", check_float(self.tau, "tau", minimum=0.0))
        check_positive_int(self.Fn, "Fn", minimum=1)
        check_positive_int(self.Bn, "Bn", minimum=0)
        _sensitivities(self.sensitivities, self.calibration)  # validates both (and reads the file)
        if self.sensitivities is not None:
            self._set("sensitivities", dict(self.sensitivities))
        if self.calibration is not None:
            self._set("calibration", os.fspath(self.calibration))
        self._set("repeat_penalty", check_float(self.repeat_penalty, "repeat_penalty", minimum=1.0))
        check_positive_int(self.min_interval, "min_interval")
        check_positive_int(self.max_interval, "max_interval")
        check_positive_int(self.interval, "interval")
        if not self.min_interval <= self.interval <= self.max_interval:
            raise ValueError(f"need min_interval <= interval <= max_interval, got {self.min_interval}, {self.interval}, {self.max_interval}")
        self._set("delta1", check_float(self.delta1, "delta1", minimum=0.0))
        self._set("delta2", check_float(self.delta2, "delta2", minimum=0.0))
        if self.delta1 > self.delta2:
            raise ValueError(f"need delta1 <= delta2, got {self.delta1} > {self.delta2}")
        if self.block_guard is not None:
            self._set("block_guard", check_float(self.block_guard, "block_guard", minimum=0.0))
        granularities = self.granularities
        if isinstance(granularities, str) or not set(granularities) <= set(GRANULARITIES) or not granularities:
            raise ValueError(f"granularities must be a non-empty subset of {GRANULARITIES}, got {granularities!r}")
        self._set("granularities", tuple(g for g in GRANULARITIES if g in set(granularities)))
        check_num_steps(self.num_steps)


class MixCachePolicy:
    name = "mixcache"

    def __init__(self, config: MixCacheConfig | None = None) -> None:
        self.config = config = expect_config(config, MixCacheConfig)
        self.warmup = config.warmup
        self.final_full = config.final_full
        self.tau = config.tau
        self.Fn = config.Fn
        self.Bn = config.Bn
        self.sensitivities = _sensitivities(config.sensitivities, config.calibration)
        self.repeat_penalty = config.repeat_penalty
        self.min_interval = config.min_interval
        self.max_interval = config.max_interval
        self.initial_interval = config.interval
        self.delta1 = config.delta1
        self.delta2 = config.delta2
        self.block_guard = config.block_guard
        self.granularities = tuple(config.granularities)
        self.num_steps = config.num_steps
        self.block_range: tuple[int, int] | None = None
        self._half_batch = False
        self._probing = False
        self.reset()

    # ---- protocol -------------------------------------------------------------------------
    def reset(self) -> None:
        self._branches: dict[str, _Branch] = {}
        self._delta = "none"  # "none" | "fresh" | "stale"
        self._d_cfg: float | None = None
        self._plan_step: int | None = None
        self._plan: str | None = None
        self._last_cached: str | None = None
        self._run = 0
        self._run_used: set[str] = set()
        self._pending_refresh: set[str] = set()
        self._interval = self.initial_interval
        self._step_devs: dict[str, float] = {}
        self._now: tuple[int | None, dict[str, ActionKind]] = (None, {})
        self.log: list[StepDecision] = []

    def needs(self, model: ModelInfo) -> CacheNeeds:
        self._half_batch = model.half_batch_available
        rng = (self.Fn, model.num_blocks - self.Bn)
        usable = "block" in self.granularities and rng[0] < rng[1] and rng in model.reusable_ranges
        self.block_range = rng if usable else None
        # The probe needs the first Fn blocks to pair their hidden stream (as a skippable range does).
        self._probing = usable and self.block_guard is not None and (0, self.Fn) in model.reusable_ranges
        return CacheNeeds(
            outputs=True,
            cfg_delta="cfg" in self.granularities,
            ranges={rng} if usable else set(),
            probe=Probe("blocks", blocks=self.Fn, update="always") if self._probing else None,
            deviations=True,
        )

    def decide(self, obs: Observation) -> Action:
        if obs.step != self._plan_step:
            self._plan_next(obs.step, resolve_num_steps(obs.num_steps, self.num_steps))
        return self._action(obs)

    def after_probe(self, obs: Observation, indicator: float) -> Action:
        if self._plan == "block" and self._can_block(obs.branch):
            if math.isfinite(indicator) and indicator <= self.block_guard:  # type: ignore[operator]
                return Action(ActionKind.BLOCK, block_range=self.block_range)
        return FULL

    def observe(self, report: CallReport) -> None:
        if report.step is None:
            return
        b, kind, devs = report.branch, report.action.kind, report.deviations
        state = self._branches.setdefault(b, _Branch())
        if self._now[0] != report.step:
            self._now = (report.step, {})
        if kind is ActionKind.FULL:
            if state.out_fresh and "step" in devs:
                state.d_step = devs["step"]
                self._note("step", devs["step"])
            if self.block_range is not None:
                key = f"block:{self.block_range[0]}-{self.block_range[1]}"
                if key in devs:
                    state.d_block = devs[key]
                    self._note("block", devs[key])
                state.residual = True
            state.out_fresh = True
        elif kind is ActionKind.BLOCK:
            state.out_fresh = False
        elif kind is ActionKind.CFG:
            state.out_fresh = False  # the runtime keeps the rebuilt output as this branch's output
        if kind in (ActionKind.FULL, ActionKind.BLOCK):
            self._now[1][b] = kind
            self._note_delta(b, kind, devs)

    # ---- planning -------------------------------------------------------------------------
    def _plan_next(self, step: int, total: int) -> None:
        if self._pending_refresh:
            self._adapt_interval(self._pending_refresh)
            self._pending_refresh = set()
        self._step_devs = {}
        warm = math.ceil(self.warmup * total - 1e-9)
        if step >= warm:
            for state in self._branches.values():
                if not state.triggered and state.d_step is not None and state.d_step < self.tau:
                    state.triggered = True
        cacheable = warm <= step < total - self.final_full and self._run < self._interval
        scores = self._scores() if cacheable else {}
        choice = min(scores, key=scores.__getitem__) if scores else None  # ties: step, cfg, block order
        if choice is None:
            if self._run:
                self._pending_refresh = set(self._run_used)
            self._run, self._run_used = 0, set()
        else:
            self._run += 1
            self._run_used.add(choice)
            self._last_cached = choice
        self._plan_step, self._plan = step, choice
        self.log.append(StepDecision(step, choice, scores, self._interval))

    def _scores(self) -> dict[str, float]:
        """``D(g) * I(g)`` (x ``repeat_penalty`` for the last cached granularity) of each candidate."""
        branches = self._branches
        if not branches:
            return {}
        after_step = self._plan == "step"
        distances: dict[str, float | None] = {}
        if "step" in self.granularities and not after_step and all(s.triggered and s.out_fresh for s in branches.values()):
            distances["step"] = _max_known([s.d_step for s in branches.values()])
        cfg_branch = self._cfg_branch()
        if cfg_branch is not None and branches[cfg_branch].triggered and self._delta == "fresh":
            distances["cfg"] = self._d_cfg
        if self.block_range is not None and not after_step and all(s.triggered and s.residual for s in branches.values()):
            distances["block"] = _max_known([s.d_block for s in branches.values()])
        scores = {}
        for g, d in distances.items():
            if d is not None:
                penalty = self.repeat_penalty if g == self._last_cached else 1.0
                scores[g] = d * self.sensitivities[g] * penalty
        return scores

    def _cfg_branch(self) -> str | None:
        if "cfg" not in self.granularities:
            return None
        if "uncond" in self._branches and "cond" in self._branches:
            return "uncond"
        if "batch" in self._branches and self._half_batch:
            return "batch"
        return None

    def _adapt_interval(self, used: set[str]) -> None:
        errors = [self._step_devs[g] * self.sensitivities[g] for g in used if g in self._step_devs]
        if not errors:
            return
        error = max(errors)
        if error > self.delta2:
            self._interval = max(self.min_interval, self._interval - 1)
        elif error < self.delta1:
            self._interval = min(self.max_interval, self._interval + 1)

    # ---- per call ---------------------------------------------------------------------------
    def _action(self, obs: Observation) -> Action:
        b, plan = obs.branch, self._plan
        state = self._branches.get(b)
        compute = PROBE if self._probing else FULL
        if state is None or not state.triggered or plan is None:
            return compute
        if plan == "step":
            return STEP if state.out_fresh else compute
        if plan == "cfg":
            if b == "batch" or (b == "uncond" and "cond" in obs.computed_this_step):
                return CFG
            return compute
        if plan == "block" and self._can_block(b):
            return PROBE if self._probing else Action(ActionKind.BLOCK, block_range=self.block_range)
        return compute

    def _can_block(self, branch: str) -> bool:
        state = self._branches.get(branch)
        return self.block_range is not None and state is not None and state.triggered and state.residual

    # ---- bookkeeping --------------------------------------------------------------------------
    def _note(self, granularity: str, value: float) -> None:
        self._step_devs[granularity] = max(value, self._step_devs.get(granularity, 0.0))

    def _note_delta(self, branch: str, kind: ActionKind, devs: Mapping[str, float]) -> None:
        """Mirror the runtime's CFG difference: refreshed when uncond computes after cond at one
        step, or when a batch call computes; fresh only if every part was a full call."""
        now = self._now[1]
        if branch == "batch":
            fresh = kind is ActionKind.FULL
        elif branch == "uncond" and "cond" in now:
            fresh = kind is ActionKind.FULL and now["cond"] is ActionKind.FULL
        else:
            return
        if fresh and self._delta == "fresh" and "cfg" in devs:
            self._d_cfg = devs["cfg"]
            self._note("cfg", devs["cfg"])
        self._delta = "fresh" if fresh else "stale"


def _max_known(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else max(values)  # type: ignore[type-var]


def _sensitivities(given: Mapping[str, float] | None, path: str | os.PathLike[str] | None) -> dict[str, float]:
    """``I(g)`` from the option, a calibration file, or the shipped defaults; normalised to max 1."""
    if given is not None and path is not None:
        raise ValueError("give either sensitivities= or calibration=, not both")
    if path is not None:
        from .calibration import load

        given = load(path)
    raw: dict[str, Any] = dict(DEFAULT_SENSITIVITIES)
    if given is not None:
        if not isinstance(given, Mapping):
            raise TypeError(f"sensitivities must be a mapping like {{'step': 1.0, 'cfg': 0.5, 'block': 0.8}}, got {given!r}")
        unknown = set(given) - set(GRANULARITIES)
        if unknown:
            raise ValueError(f"sensitivities has unknown granularities {sorted(unknown)}; valid: {GRANULARITIES}")
        raw.update(given)
    values = {g: check_float(raw[g], f"sensitivities[{g!r}]", minimum=0.0) for g in GRANULARITIES}
    top = max(values.values())
    if top <= 0:
        raise ValueError("sensitivities must have at least one positive value")
    return {g: v / top for g, v in values.items()}
