"""Policy ``fastercache``: FasterCache (arXiv 2410.19355) on the mixcache runtime.

Two parts, each switchable by its window (``None`` disables it):

**Dynamic feature reuse** (``ATTN`` on every block). Inside ``attn_window`` a branch's
self-attention is computed on one step and reused on the next ``attn_interval - 1`` steps:
a call reuses iff its branch last computed attention ``k`` steps ago with
``0 < k < attn_interval``. The reused value is the extrapolation of the last two *computed*
outputs (the runtime keeps them with ``history=2``)::

    F(i) = F_last + w(i) * (F_last - F_prev)

``attn_weight="linear"`` (paper): ``w(i) = clamp((i - s) / (T - 1 - s), 0, 1)`` rising from 0
at the window start ``s`` to 1 at the last step; a number is a constant weight (official
scripts: 0.3 or 0.5; diffusers: 0.5); a callable ``f(step, num_steps) -> float`` is any
schedule. With one computed value only, the value is reused as is.

**CFG-Cache** (``CFG`` on the unconditional branch). Inside ``cfg_window`` the first step and
every ``cfg_interval``-th step after it compute both branches ("refresh"); the others compute
the conditional branch only and rebuild ``eps_u`` from this step's ``eps_c`` and the last
refresh's ``delta = eps_u - eps_c``, split in frequency (``frequency.py``)::

    eps_u = IFFT(FFT(c) + w1*low(FFT(delta)) + w2*high(FFT(delta))).real

``boost="paper"`` (default): ``w1 = 1 + alpha_low*[i in low window]``, ``w2 = 1 +
alpha_high*[i in high window]``, the paper's ``[t > t0]`` / ``[t <= t0]`` with the boundary at
step ``t0 * T`` (defaults ``alpha_low = alpha_high = 0.2``). ``boost="compound"`` is the
official code's and diffusers' rule: the stored difference is multiplied in place by
``1 + alpha`` on every skipped step inside the boost window and reset at each refresh, so
``w = prod_j (1 + alpha*[j in window])`` over the skipped steps ``j`` since the refresh,
the current one included (defaults ``alpha = 0.1``, i.e. x1.1; windows (0.1, 0.9) low and
(0.7, 1.0) high: diffusers' timestep windows (99, 901) and (-1, 301) on a linear schedule).

**How the two parts interleave**:
  * separate CFG (one call per branch): at a skipped CFG step the cond call may reuse
    attention (its own alternation) and the uncond call is ``CFG``; at a refresh step both
    calls compute in full (so the stored difference comes from two exact outputs); outside
    the CFG window each branch alternates attention on its own history.
  * batched CFG (one call carries both halves): a skipped CFG step computes the cond half
    only, and that half reuses attention on its own alternation in the same call (the
    composite action ``CFG+ATTN``, as the paper and diffusers do: attention is reused on the
    cond half of skipped-uncond steps); the cond half's attention history is fed by every
    call that computes it (full batch calls and plain ``CFG`` calls; ``CacheNeeds.cond_half``).
    Refresh steps compute in full; outside the CFG window the batch alternates ``ATTN``.
  Per-branch state everywhere: each branch (and the cond half) has its own attention history
  (runtime) and alternation (here); the CFG product is kept per rebuilt branch.

**Defaults** (METHODS.md; fractions scale with the run's ``T``): attention interval 2 in
(0.3, 1.0) (starting a little before the CFG window, like diffusers' t=681 vs t=641 windows),
linear weight; CFG interval 5 in (1/3, 1.0) (paper: full CFG every 5 steps from 1/3 of the
steps); ``t0 = 0.7`` (**reconstruction**: the paper does not give t0; 0.7 T is t ~ 300 on a
linear schedule, the upper end of the official high-frequency boost window); low-pass disc
radius ``min(H, W) // 5``. If the runtime does not know ``T`` (diffusers pipelines do not
report it), ``num_steps`` is used, else 50.

Note on the phase: the CFG refresh steps are counted from the window start; diffusers counts
them from step 0 (``iteration % 5``). Both agree when the window starts at a multiple of the
interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .config import PolicyConfig, expect_config
from .frequency import rebuild_from_delta
from .base import PolicyBase
from .protocol import CFG, COND_HALF, FULL, Action, ActionKind, CacheNeeds, CallReport, ModelInfo, Observation
from .schedules import StepWindow, WindowSpec, check_float, check_num_steps, check_positive_int, resolve_num_steps, window_value

WeightSpec = float | str | Callable[[int, int], float]

_BOOST_MODES = ("paper", "compound")
_COMPUTED = (ActionKind.FULL, ActionKind.ATTN, ActionKind.BLOCK)


@dataclass(frozen=True)
class FasterCacheConfig(PolicyConfig):
    """Options of ``fastercache`` (windows: fractions (a, b) of the steps, explicit step
    indices, or None = off; see the module docstring for the defaults' sources)."""

    name: ClassVar[str] = "fastercache"
    attn_interval: int = 2  # a branch computes attention once per ``attn_interval`` steps (>= 2)
    attn_window: WindowSpec = (0.3, 1.0)  # where attention may be reused (None: never)
    attn_weight: WeightSpec = "linear"  # extrapolation weight: "linear", a number, or f(step, num_steps)
    cfg_interval: int = 5  # both branches compute every ``cfg_interval``-th step of the window (>= 2)
    cfg_window: WindowSpec = (1 / 3, 1.0)  # where the uncond branch may be rebuilt (None: never)
    boost: str = "paper"  # frequency boost rule: "paper" or "compound"
    alpha_low: float | None = None  # low-frequency boost (None: 0.2 paper, 0.1 compound; >= -1)
    alpha_high: float | None = None  # high-frequency boost (None: as alpha_low's default; >= -1)
    t0: float = 0.7  # paper boost boundary, a fraction of the steps in [0, 1]
    low_boost_window: WindowSpec = None  # None: (0, t0) paper, (0.1, 0.9) compound
    high_boost_window: WindowSpec = None  # None: (t0, 1) paper, (0.7, 1.0) compound
    lowpass_divisor: int = 5  # low-pass disc radius = min(H, W) // lowpass_divisor (>= 1)
    num_steps: int | None = None  # step count when the runtime does not know it (None: 50)

    def __post_init__(self) -> None:
        check_positive_int(self.attn_interval, "attn_interval", minimum=2)
        self._set("attn_window", window_value(self.attn_window, "attn_window"))
        self._set("attn_weight", _check_weight(self.attn_weight))
        check_positive_int(self.cfg_interval, "cfg_interval", minimum=2)
        self._set("cfg_window", window_value(self.cfg_window, "cfg_window"))
        if self.boost not in _BOOST_MODES:
            raise ValueError(f"boost must be one of {_BOOST_MODES}, got {self.boost!r}")
        for key in ("alpha_low", "alpha_high"):
            if getattr(self, key) is not None:
                self._set(key, check_float(getattr(self, key), key, minimum=-1.0))
        self._set("t0", check_float(self.t0, "t0", 0.0, 1.0))
        self._set("low_boost_window", window_value(self.low_boost_window, "low_boost_window"))
        self._set("high_boost_window", window_value(self.high_boost_window, "high_boost_window"))
        check_positive_int(self.lowpass_divisor, "lowpass_divisor")
        check_num_steps(self.num_steps)


class FasterCachePolicy(PolicyBase):
    name = "fastercache"

    def __init__(self, config: FasterCacheConfig | None = None) -> None:
        self.config = config = expect_config(config, FasterCacheConfig)
        self.attn_interval = config.attn_interval
        self.attn_window = StepWindow.parse(config.attn_window, "attn_window")
        self.attn_weight = config.attn_weight
        self.cfg_interval = config.cfg_interval
        self.cfg_window = StepWindow.parse(config.cfg_window, "cfg_window")
        self.boost = config.boost
        default_alpha = 0.2 if config.boost == "paper" else 0.1
        self.alpha_low = default_alpha if config.alpha_low is None else config.alpha_low
        self.alpha_high = default_alpha if config.alpha_high is None else config.alpha_high
        self.t0 = config.t0
        default_low, default_high = ((0.0, self.t0), (self.t0, 1.0)) if config.boost == "paper" else ((0.1, 0.9), (0.7, 1.0))
        low, high = config.low_boost_window, config.high_boost_window
        self.low_boost_window = StepWindow.parse(default_low if low is None else low, "low_boost_window")
        self.high_boost_window = StepWindow.parse(default_high if high is None else high, "high_boost_window")
        self.lowpass_divisor = config.lowpass_divisor
        self.num_steps = config.num_steps
        self._model: ModelInfo | None = None
        self._attn_action = FULL  # ATTN over every block, set in needs()
        self.reset()

    # ---- protocol -------------------------------------------------------------------------
    def reset(self) -> None:
        self._attn_step: dict[str, int] = {}  # branch -> last step its attention was computed
        self._skipped: dict[str, list[int]] = {}  # rebuilt branch -> CFG-skipped steps since refresh
        self._computed_at: tuple[int | None, set[str]] = (None, set())

    def needs(self, model: ModelInfo) -> CacheNeeds:
        self._model = model
        needs = CacheNeeds(cfg_delta=not self.cfg_window.is_empty())
        if self._attention_on():
            needs.attn_blocks = set(range(model.num_blocks))
            needs.history = 2
            needs.cond_half = needs.cfg_delta and model.half_batch_available
            self._attn_action = Action(ActionKind.ATTN, attn_blocks=tuple(range(model.num_blocks)))
        return needs

    def decide(self, obs: Observation) -> Action:
        total = resolve_num_steps(obs.num_steps, self.num_steps)
        phase = self._cfg_phase(obs.step, total)
        if phase and self._can_rebuild(obs):
            if obs.branch == "batch" and self._reuses_attention(COND_HALF, obs.step, total):
                return self._attn_action.with_cfg()
            return CFG
        if phase != 0 and self._reuses_attention(obs.branch, obs.step, total):
            return self._attn_action
        return FULL

    def observe(self, report: CallReport) -> None:
        if report.step is None:
            return
        kind, branch = report.action.kind, report.branch
        if self._computed_at[0] != report.step:
            self._computed_at = (report.step, set())
        if kind is ActionKind.FULL:
            self._attn_step[branch] = report.step
        if branch == "batch" and (kind is ActionKind.FULL or report.action == CFG):
            self._attn_step[COND_HALF] = report.step  # the cond half computed its attention
        if kind in _COMPUTED:
            self._computed_at[1].add(branch)
            if branch == "batch" or (branch == "uncond" and "cond" in self._computed_at[1]):
                self._skipped[branch] = []  # the runtime refreshed the CFG difference
        elif kind is ActionKind.CFG and branch in ("uncond", "batch"):
            self._skipped.setdefault(branch, []).append(report.step)

    # ---- hooks the runtime calls ------------------------------------------------------------
    def reuse_attention(self, block: int, current: list[torch.Tensor], previous: list[torch.Tensor] | None, obs: Observation | None) -> list[torch.Tensor]:
        """``F_last + w * (F_last - F_prev)``; plain reuse while only one computed value exists."""
        if previous is None or obs is None:
            return list(current)
        w = self.attention_weight(obs.step, resolve_num_steps(obs.num_steps, self.num_steps))
        if w == 0.0:
            return list(current)
        return [c + (c - p) * w for c, p in zip(current, previous)]

    def rebuild_uncond(self, cond: torch.Tensor, delta: torch.Tensor, obs: Observation | None) -> torch.Tensor:
        """``IFFT(FFT(c) + w1*low(FFT(delta)) + w2*high(FFT(delta))).real``."""
        if obs is None:
            return cond + delta
        w_low, w_high = self.cfg_weights(obs.step, resolve_num_steps(obs.num_steps, self.num_steps), obs.branch)
        return rebuild_from_delta(cond, delta, w_low, w_high, self.lowpass_divisor)

    # ---- schedules (public for inspection and tests) ------------------------------------------
    def attention_weight(self, step: int, num_steps: int) -> float:
        """``w(i)``: the linear ramp from the window start to the last step, or the user's."""
        if callable(self.attn_weight):
            return float(self.attn_weight(step, num_steps))
        if isinstance(self.attn_weight, float):
            return self.attn_weight
        start = self.attn_window.start(num_steps) or 0
        span = max(num_steps - 1 - start, 1)
        return min(max((step - start) / span, 0.0), 1.0)

    def cfg_weights(self, step: int, num_steps: int, branch: str = "uncond") -> tuple[float, float]:
        """``(w1, w2)`` of the rebuild at ``step`` (see the module docstring for both modes)."""
        if self.boost == "paper":
            return self._boost_factors(step, num_steps)
        w_low = w_high = 1.0
        for j in [*self._skipped.get(branch, []), step]:
            m_low, m_high = self._boost_factors(j, num_steps)
            w_low, w_high = w_low * m_low, w_high * m_high
        return w_low, w_high

    # ---- internals ------------------------------------------------------------------------------
    def _boost_factors(self, step: int, num_steps: int) -> tuple[float, float]:
        low = 1.0 + self.alpha_low * self.low_boost_window.contains(step, num_steps)
        high = 1.0 + self.alpha_high * self.high_boost_window.contains(step, num_steps)
        return low, high

    def _cfg_phase(self, step: int, num_steps: int) -> int | None:
        """None outside the CFG window; else the position in the refresh period (0 = refresh)."""
        if not self.cfg_window.contains(step, num_steps):
            return None
        start = self.cfg_window.start(num_steps)
        return (step - (start if start is not None else step)) % self.cfg_interval

    def _can_rebuild(self, obs: Observation) -> bool:
        if obs.branch == "uncond":
            return "cond" in obs.computed_this_step
        if obs.branch == "batch":
            return bool(self._model and self._model.half_batch_available)
        return False

    def _attention_on(self) -> bool:
        return bool(self._model and self._model.attention_reusable and self._model.num_blocks) and not self.attn_window.is_empty()

    def _reuses_attention(self, branch: str, step: int, num_steps: int) -> bool:
        if not self._attention_on() or not self.attn_window.contains(step, num_steps):
            return False
        last = self._attn_step.get(branch)
        return last is not None and 0 < step - last < self.attn_interval


def _check_weight(value: Any) -> WeightSpec:
    if callable(value):
        return value
    if value == "linear":
        return "linear"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"attn_weight must be 'linear', a number or a callable(step, num_steps), got {value!r}")
