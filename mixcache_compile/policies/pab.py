"""Policy ``pab``: Pyramid Attention Broadcast (arXiv 2408.12588) on the mixcache runtime.

A fixed schedule: inside ``window`` the self-attention of ``blocks`` is computed on the
window's first step and every ``interval``-th step after it, and *broadcast* (the last
computed output reused as is, no extrapolation) on the steps in between::

    ATTN(blocks)  iff  i in window  and  (i - window_start) % interval != 0

Outside the window every call computes. Per branch: each branch reuses its own last computed
attention (the runtime's cache is per branch).

Defaults: ``interval=2`` on all blocks in ``(0.2, 0.9)`` of the steps, diffusers'
``PyramidAttentionBroadcastConfig`` spatial window (100, 800) in timesteps mapped linearly
to steps. The "pyramid" (different ranges for spatial, temporal and cross attention) has one
level here: the runtime cuts only each block's self-attention. diffusers counts its period
in calls from the first call; this schedule counts steps from the window start.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .config import PolicyConfig, expect_config
from .base import PolicyBase
from .protocol import FULL, Action, ActionKind, CacheNeeds, ModelInfo, Observation
from .schedules import StepWindow, WindowSpec, check_num_steps, check_positive_int, resolve_num_steps, window_value


@dataclass(frozen=True)
class PabConfig(PolicyConfig):
    """Options of ``pab`` (defaults: diffusers' spatial broadcast window, interval 2)."""

    name: ClassVar[str] = "pab"
    interval: int = 2  # compute attention every ``interval``-th step of the window (>= 2)
    window: WindowSpec = (0.2, 0.9)  # fractions (a, b) of the steps, or explicit step indices
    blocks: Sequence[int] | None = None  # blocks whose attention is broadcast (None: all)
    num_steps: int | None = None  # step count when the runtime does not know it (None: 50)

    def __post_init__(self) -> None:
        check_positive_int(self.interval, "interval", minimum=2)
        self._set("window", window_value(self.window, "window"))
        blocks = self.blocks
        if blocks is not None:
            if isinstance(blocks, (str, bytes)) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
                raise ValueError(f"blocks must be a sequence of block indices >= 0, got {blocks!r}")
            blocks = tuple(sorted(set(blocks)))
            if not blocks:
                raise ValueError("blocks must name at least one block (None means all)")
        self._set("blocks", blocks)
        check_num_steps(self.num_steps)


class PABPolicy(PolicyBase):
    name = "pab"

    def __init__(self, config: PabConfig | None = None) -> None:
        self.config = config = expect_config(config, PabConfig)
        self.interval = config.interval
        self.window = StepWindow.parse(config.window, "window")
        self.blocks: tuple[int, ...] | None = config.blocks  # type: ignore[assignment]  (normalised)
        self.num_steps = config.num_steps
        self._attn: tuple[int, ...] = ()

    def reset(self) -> None:
        pass

    def needs(self, model: ModelInfo) -> CacheNeeds:
        if self.blocks is not None and max(self.blocks) >= model.num_blocks:
            raise ValueError(f"pab: blocks {list(self.blocks)} out of range for a {model.num_blocks}-block model")
        self._attn = self.blocks if self.blocks is not None else tuple(range(model.num_blocks))
        if not model.attention_reusable:
            self._attn = ()
        return CacheNeeds(attn_blocks=set(self._attn))

    def broadcasts(self, step: int, num_steps: int) -> bool:
        """Whether ``step`` reuses attention under the fixed schedule."""
        if not self.window.contains(step, num_steps):
            return False
        start = self.window.start(num_steps)
        return start is not None and (step - start) % self.interval != 0

    def decide(self, obs: Observation) -> Action:
        if self._attn and self.broadcasts(obs.step, resolve_num_steps(obs.num_steps, self.num_steps)):
            return Action(ActionKind.ATTN, attn_blocks=self._attn)
        return FULL
