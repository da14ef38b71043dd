"""Policy ``teacache``: TeaCache (arXiv 2411.19108) on the mixcache runtime.

Every call probes the prologue: the relative L1 change of the timestep-modulation tensor the
prologue hands to the first block (the runtime's ``Probe("prologue")``, computed in the graph)
against the previous call of the same branch::

    x_i = mean|m_i - m_prev| / mean|m_prev|          (m_prev replaced on every probe)
    acc += f(x_i),   f = polynomial(coefficients) or the identity
    acc <  threshold -> STEP (skip the call: reuse this branch's last output)
    acc >= threshold -> compute, acc = 0

The first ``warmup`` steps and the last ``final_full`` steps always compute (TeaCache
computes its first and last step), as does any call whose indicator is not finite (no
previous value). One accumulator per branch.

``coefficients`` are highest degree first (``numpy.poly1d`` order). TeaCache fits them per
model on its own indicator (the modulated input of block 0); this runtime's indicator is the
time-modulation tensor, so published coefficients do not transfer: the default is the
identity (**reconstruction**; fit your own on a calibration run if needed). The default
``threshold=0.1`` is a middle value of TeaCache's published range (0.05 - 0.2).

The skip reuses the whole output (``STEP``), where the original adds the cached residual of
the blocks to the current prologue output and runs the epilogue: a coarser reuse, the same
decision rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .config import PolicyConfig, expect_config
from .base import PolicyBase
from .protocol import FULL, PROBE, STEP, Action, ActionKind, CacheNeeds, CallReport, ModelInfo, Observation, Probe
from .schedules import check_float, check_num_steps, check_positive_int, resolve_num_steps


@dataclass(frozen=True)
class TeaCacheConfig(PolicyConfig):
    """Options of ``teacache`` (see the module docstring for where the defaults come from)."""

    name: ClassVar[str] = "teacache"
    threshold: float = 0.1  # skip while the accumulated rescaled indicator stays below this (>= 0)
    coefficients: Sequence[float] | None = None  # rescaling polynomial, highest degree first (None: identity)
    warmup: int = 1  # the first steps always compute (>= 0)
    final_full: int = 1  # the last steps always compute (>= 0)
    num_steps: int | None = None  # step count when the runtime does not know it (None: 50)

    def __post_init__(self) -> None:
        self._set("threshold", check_float(self.threshold, "threshold", minimum=0.0))
        coefficients = self.coefficients
        if coefficients is not None:
            if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Sequence) or not coefficients:
                raise TypeError(f"coefficients must be a non-empty sequence of numbers, got {coefficients!r}")
            coefficients = tuple(check_float(c, "coefficients[]") for c in coefficients)
        self._set("coefficients", coefficients)
        check_positive_int(self.warmup, "warmup", minimum=0)
        check_positive_int(self.final_full, "final_full", minimum=0)
        check_num_steps(self.num_steps)


class TeaCachePolicy(PolicyBase):
    name = "teacache"

    def __init__(self, config: TeaCacheConfig | None = None) -> None:
        self.config = config = expect_config(config, TeaCacheConfig)
        self.threshold = config.threshold
        self.coefficients: tuple[float, ...] | None = config.coefficients  # type: ignore[assignment]  (normalised)
        self.warmup = config.warmup
        self.final_full = config.final_full
        self.num_steps = config.num_steps
        self.reset()

    def reset(self) -> None:
        self.accumulated: dict[str, float] = {}

    def needs(self, model: ModelInfo) -> CacheNeeds:
        return CacheNeeds(outputs=True, probe=Probe("prologue", update="always"))

    def decide(self, obs: Observation) -> Action:
        return PROBE

    def rescale(self, x: float) -> float:
        """``f(x)``: the polynomial (Horner), or ``x`` itself without coefficients."""
        if self.coefficients is None:
            return x
        value = 0.0
        for c in self.coefficients:
            value = value * x + c
        return value

    def after_probe(self, obs: Observation, indicator: float) -> Action:
        total = resolve_num_steps(obs.num_steps, self.num_steps)
        forced = obs.step < self.warmup or obs.step >= total - self.final_full
        if forced or not math.isfinite(indicator):
            self.accumulated[obs.branch] = 0.0
            return FULL
        acc = self.accumulated.get(obs.branch, 0.0) + self.rescale(indicator)
        if acc < self.threshold:
            self.accumulated[obs.branch] = acc
            return STEP
        self.accumulated[obs.branch] = 0.0
        return FULL

    def observe(self, report: CallReport) -> None:
        # A skip the runtime could not run computed instead: the accumulation restarts.
        if report.action.kind is not ActionKind.STEP:
            self.accumulated[report.branch] = 0.0
