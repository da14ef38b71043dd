"""Other ways to fill skipped steps in the schedule simulator (issue #13, 28 dB level).

``cfg_schedule_sim.Simulator`` fills a skipped step ("S") by extrapolating each branch's model
output (a flow-matching velocity) linearly in the sampler's timestep from the last two computed
steps, damped. ``FillSimulator`` keeps that simulator (same model calls, same memo, same
uncached reference) and, when its ``fill`` is set, fills the skipped steps of a step-only
schedule (letters F and S) by a :class:`Fill` instead:

  * ``quantity``: what is extrapolated from the last two computed steps ``i1 < i2``:
      ``v``     the branch output itself (the simulator's rule);
      ``x0``    the clean-sample estimate ``x0 = x - sigma v`` (the scheduler's convention
                ``x_t = (1 - sigma) x0 + sigma noise``, ``v = noise - x0``), then
                ``v = (x - x0_hat) / sigma`` from the *current* sample ``x``;
      ``noise`` the noise estimate ``n = x + (1 - sigma) v``, then ``v = (n_hat - x) / (1 - sigma)``.
  * ``coord``: the coordinate the extrapolation is linear in: ``t`` (sampler timestep),
    ``sigma``, ``logsigma``, ``index`` (step number).
  * ``damping``: ``w = (c_i - c_i2) / (c_i2 - c_i1) / (1 + damping (i - i2 - 1))``;
    ``math.inf`` holds the last value (``w = 0``).
  * ``diff_damping``: if set, the guidance difference ``d = c - u`` (what CFG multiplies by
    ``g - 1``) gets this damping and the cond the main one; the uncond is ``c_hat - d_hat``.
  * ``at``: ``start`` evaluates the extrapolation at the step's own coordinate (as the simulator
    does); ``mid`` at the midpoint of ``[c_i, c_i+1]`` (the Euler step then integrates the
    linear extrapolation exactly: an Adams-Bashforth-like use of the last two outputs).
  * ``correct``: a corrector at the computed step after a gap (Note [corrector]): the skipped
    steps' outputs re-estimated by interpolation between the computed steps around the gap,
    the sample's resulting offset added through the computed step's outputs (no model call);
    ``keep_x0`` also moves the outputs with the sample, keeping the model's clean estimate.

``logsigma`` clamps sigma at 1e-6 (the sampler's final sigma is 0; only ``mid`` on the last
step reads it).

All rules are linear in the branch outputs at a given sample, so applying them per branch and
combining with CFG equals applying them to the CFG-combined output. ``Fill()`` (``v``, ``t``,
the simulator's damping, ``start``) reproduces ``Simulator.run_sample(..., skip_mode="full")``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cfg_schedule_sim import Sample, Simulator  # noqa: E402

QUANTITIES = ("v", "x0", "noise")
COORDS = ("t", "sigma", "logsigma", "index")


@dataclass(frozen=True)
class Fill:
    quantity: str = "v"
    coord: str = "t"
    damping: float | None = None  # None: the simulator's damping
    diff_damping: float | None = None  # None: the same as ``damping``
    at: str = "start"
    correct: float = 0.0  # corrector weight (0: none; Note [corrector])
    keep_x0: bool = False  # the corrector keeps i2's clean estimate x0 = x - sigma v (Note [corrector])

    def __post_init__(self) -> None:
        if self.quantity not in QUANTITIES or self.coord not in COORDS or self.at not in ("start", "mid"):
            raise ValueError(f"bad fill {self!r}")

    @property
    def tag(self) -> str:
        return f"{self.quantity}/{self.coord}/{self.damping}/{self.diff_damping}/{self.at}/{self.correct}/{self.keep_x0}"


@dataclass
class Computed:
    step: int
    x: torch.Tensor  # the sample the calls saw
    c: torch.Tensor
    u: torch.Tensor


class FillSimulator(Simulator):
    """``Simulator`` whose skipped steps follow ``self.fill`` (``None``: the base rule)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.fill: Fill | None = None
        super().__init__(*args, **kwargs)
        sigmas = [float(s) for s in self.pipe.scheduler.sigmas]
        self.sigmas = sigmas  # T + 1 values, the last 0
        self.coords = {
            "t": [*self.timesteps, 0.0],
            "sigma": sigmas,
            "logsigma": [math.log(max(s, 1e-6)) for s in sigmas],
            "index": [float(i) for i in range(len(sigmas))],
        }

    def run_sample(self, sample: Sample | int, schedule: str, skip_mode: str = "full", half_mode: str = "extrapolated") -> torch.Tensor:
        if self.fill is None or "H" in schedule:
            return super().run_sample(sample, schedule, skip_mode, half_mode)
        if not isinstance(sample, int):
            raise TypeError("fills run on the simulator's own samples (an index)")
        if len(schedule) != self.steps or schedule[0] != "F" or set(schedule) - {"F", "S"}:
            raise ValueError(f"a step-only schedule has {self.steps} letters F/S and starts with F: {schedule!r}")
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(self.steps, device="cpu")
        scheduler.set_begin_index(0)
        x = self.samples[sample].latents.clone()
        history: list[Computed] = []
        gap: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # fills since the last computed step
        for i, t in enumerate(scheduler.timesteps):
            if schedule[i] == "F":
                # a computed step's input depends on the fill once a skip precedes it
                prefix = schedule[: i + 1] if "S" not in schedule[:i] else f"{self.fill.tag}|{schedule[: i + 1]}"
                c = self._call(sample, prefix, "cond", x, t)
                u = self._call(sample, prefix, "uncond", x, t)
                fresh = Computed(i, x, c, u)
                if self.fill.correct and gap:
                    c, u = self.corrected(self.fill, history[-1], fresh, gap)
                history, gap = [*history, fresh][-2:], []
            else:
                c, u = self.fill_step(self.fill, history, i, x)
                gap.append((i, c, u))
            x = scheduler.step(u + self.guidance * (c - u), t, x, return_dict=False)[0]
        return x.clamp(-1.0, 1.0)

    def weight(self, i: int, pair: list[int], fill: Fill | None = None, damping: float | None = None) -> float:
        if fill is None:
            return super().weight(i, pair)
        if len(pair) < 2:
            return 0.0
        damp = damping if damping is not None else (fill.damping if fill.damping is not None else self.damping)
        if math.isinf(damp):
            return 0.0
        cs = self.coords[fill.coord]
        i1, i2 = pair
        at = cs[i] if fill.at == "start" else 0.5 * (cs[i] + cs[i + 1])
        return (at - cs[i2]) / (cs[i2] - cs[i1]) / (1.0 + damp * max(i - i2 - 1, 0))

    # Note [corrector]: once the computed step i2 after a gap is known, the outputs the skipped
    # steps k in (i1, i2) should have had are better estimated by interpolating between the
    # fresh outputs at i1 and i2 (linear in the fill's coordinate) than by the extrapolation
    # used then. The sample at i2 is off by sum_k h_k (v_interp(k) - v_fill(k)) (h_k = sigma_k+1
    # - sigma_k, the Euler step); the step at i2 adds ``correct`` times that, folded into i2's
    # outputs: v_used = v2 + correct * delta / h_i2 (the model itself saw the uncorrected
    # sample; ``keep_x0`` moves the output with the sample, keeping x0). A predictor-corrector in "PEC" mode (UniPC's corrector also reuses the output at
    # the uncorrected point), with no model call; it needs only outputs and sigmas, so a policy
    # that sees outputs can apply it. The stored fresh outputs (for later extrapolation) stay raw.
    def corrected(self, fill: Fill, prev: Computed, fresh: Computed,
                  gap: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        cs, sig = self.coords[fill.coord], self.sigmas
        i1, i2 = prev.step, fresh.step
        dc = torch.zeros_like(fresh.c)
        du = torch.zeros_like(fresh.u)
        for k, ck, uk in gap:
            a = (cs[k] - cs[i1]) / (cs[i2] - cs[i1])
            h = sig[k + 1] - sig[k]
            dc += h * (prev.c + a * (fresh.c - prev.c) - ck)
            du += h * (prev.u + a * (fresh.u - prev.u) - uk)
        # keep_x0: also shift the outputs so that x0 = x - sigma v at i2 stays the model's (the
        # flow model's output moves with its input, ~1/sigma; a sample shifted without a new call
        # otherwise carries an output that no longer points at the model's x0)
        scale = fill.correct * (1.0 / (sig[i2 + 1] - sig[i2]) + (1.0 / sig[i2] if fill.keep_x0 else 0.0))
        return fresh.c + scale * dc, fresh.u + scale * du

    def fill_step(self, fill: Fill, history: list[Computed], i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cond, uncond) outputs standing in for skipped step ``i`` at sample ``x``."""
        s = self.sigmas[i]
        to_q = {"v": lambda h, b: b, "x0": lambda h, b: h.x - self.sigmas[h.step] * b,
                "noise": lambda h, b: h.x + (1.0 - self.sigmas[h.step]) * b}[fill.quantity]
        pair = [h.step for h in history]
        wc = self.weight(i, pair, fill)
        qc = [to_q(h, h.c) for h in history]
        qc_hat = qc[-1] + wc * (qc[-1] - qc[0]) if wc else qc[-1]
        if fill.diff_damping is None:  # the uncond extrapolated like the cond (as the simulator does)
            qu = [to_q(h, h.u) for h in history]
            qu_hat = qu[-1] + wc * (qu[-1] - qu[0]) if wc else qu[-1]
        else:  # the guidance difference in q with its own damping
            wd = self.weight(i, pair, fill, fill.diff_damping)
            qd = [to_q(h, h.c) - to_q(h, h.u) for h in history]
            qu_hat = qc_hat - (qd[-1] + wd * (qd[-1] - qd[0]) if wd else qd[-1])
        if fill.quantity == "v":
            return qc_hat, qu_hat
        if fill.quantity == "x0":
            return (x - qc_hat) / s, (x - qu_hat) / s
        return (qc_hat - x) / (1.0 - s), (qu_hat - x) / (1.0 - s)
