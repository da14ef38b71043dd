"""The error-budget decision of ``mixcache``: which reuses one denoising step takes.

Pure arithmetic, no runtime or tensors, so the rule is easy to restate and test.

Quantities a step may reuse (``QUANTITIES``) and the fraction of a step's FLOPs each saves:
  ``step``   both branches' outputs (the call is skipped)      saves 1
  ``cfg``    the CFG difference (uncond rebuilt from cond)      saves 1/2 (the uncond call)
  ``block``  the residual of the middle blocks, both branches   saves ``savings["block"]``
  ``attn``   every block's self-attention output, both branches saves ``savings["attn"]``
Candidate sets (``CANDIDATES``): one of them, or ``cfg`` with ``block`` / ``attn`` (the
uncond call rebuilt, the cond call skipping blocks or attention: one step, two reuses).
Their savings add, with the part reuse counted on the cond call only (1/2 of it).

Note [error budget]: each quantity ``q`` has a *staleness* ``s_q``, the sum of the step
indicators ``x`` (the prologue probe, TeaCache's rel-L1 change of the timestep modulation)
since ``q`` was last computed fresh. Reusing ``q`` at a step with indicator ``x`` is predicted
to move the final output by ``k_q * (s_q + x)`` (relative L1), ``k_q`` the per-model
coefficient from calibration (``step`` uses ``k["step_extrapolated"]`` when the output is
extrapolated from two fresh values). A candidate set ``S`` is *affordable* when
``sum_{q in S} k_q (s_q + x) * penalty(S) <= threshold``; the step takes the affordable set
saving the most FLOPs (ties: the smaller predicted error, then ``CANDIDATES`` order), or
computes in full. So ``threshold = 0`` never reuses, and raising it only adds affordable sets,
which never lowers the savings picked at a step (compute is monotone in it up to how the
staleness then evolves, which the tests check end to end).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

QUANTITIES = ("step", "cfg", "block", "attn")
# Note [priced out]: a calibration gives a partial reuse this coefficient when its price check
# finds it no better than sparser step reuse (eval/budget_fit.py). The policy then drops it
# from its candidates altogether: never chosen (k * x alone would allow it at an indicator
# below threshold / 1000), and its graph cuts not requested, so every computed call runs
# fewer stage graphs (shipped tiny: 2 instead of 7).
PRICED_OUT = 1e3
CANDIDATES: tuple[frozenset[str], ...] = (
    frozenset({"step"}),
    frozenset({"cfg", "block"}),
    frozenset({"cfg", "attn"}),
    frozenset({"cfg"}),
    frozenset({"block"}),
    frozenset({"attn"}),
)
COEFFICIENTS = ("step", "step_extrapolated", "cfg", "block", "attn")


@dataclass(frozen=True)
class Choice:
    reuse: frozenset[str]  # empty: compute in full
    error: float  # predicted final-output rel-L1 of this step's reuse
    saving: float  # fraction of the step's FLOPs saved


def saving(reuse: frozenset[str], savings: Mapping[str, float]) -> float:
    if "step" in reuse:
        return 1.0
    total = 0.5 if "cfg" in reuse else 0.0
    for part in ("block", "attn"):
        if part in reuse:
            total += savings[part] * (0.5 if "cfg" in reuse else 1.0)
    return total


def predicted_error(reuse: frozenset[str], x: float, stale: Mapping[str, float], k: Mapping[str, float], extrapolated: bool) -> float:
    total = 0.0
    for q in reuse:
        coef = k["step_extrapolated"] if (q == "step" and extrapolated) else k[q]
        total += coef * (stale.get(q, 0.0) + x)
    return total


def choose(
    allowed: list[frozenset[str]],
    x: float,
    stale: Mapping[str, float],
    k: Mapping[str, float],
    savings: Mapping[str, float],
    threshold: float,
    extrapolated: bool,
    previous: frozenset[str] = frozenset(),
    repeat_penalty: float = 1.0,
) -> Choice:
    """The affordable candidate saving the most (Note [error budget]); FULL if none."""
    best = Choice(frozenset(), 0.0, 0.0)
    for reuse in allowed:
        error = predicted_error(reuse, x, stale, k, extrapolated)
        if reuse == previous:
            error *= repeat_penalty
        if error > threshold:
            continue
        gain = saving(reuse, savings)
        if gain > best.saving + 1e-12 or (abs(gain - best.saving) <= 1e-12 and best.reuse and error < best.error):
            best = Choice(reuse, error, gain)
    return best


def advance(stale: Mapping[str, float], reuse: frozenset[str], x: float) -> dict[str, float]:
    """Staleness after a step that reused ``reuse``: reused quantities age by ``x``; the
    others were computed fresh by every branch, except what a skipped call leaves stale (a
    ``step`` reuse computes nothing; a ``cfg`` reuse leaves the uncond branch's output, residual
    and attention uncomputed), which ages too."""
    untouched: set[str] = set(reuse)
    if "step" in reuse:
        untouched |= set(QUANTITIES)
    if "cfg" in reuse:
        untouched |= {"step", "block", "attn"}
    return {q: (stale.get(q, 0.0) + x if q in untouched else 0.0) for q in QUANTITIES}
