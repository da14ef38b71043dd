"""Policy ``static``: a user-given schedule of actions per step (and optionally per branch).

``schedule`` maps a step index, or ``(step, branch)``, to an action (an ``Action`` or a string
such as ``"step"``, ``"cfg"``, ``"block:2-6"``, ``"attn:0,1"``, ``"cfg+block:2-6"``); ``(step, branch)`` entries win
over plain step entries, and unlisted calls compute in full. ``every`` is the shorthand
"compute every k-th step, reuse the others" (``reuse`` names the action used in between).
It drives every action path of the runtime, which is what the exactness tests need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .config import PolicyConfig, expect_config
from .actions import needs_of
from .base import PolicyBase
from .protocol import FULL, Action, CacheNeeds, ModelInfo, Observation

ScheduleKey = int | tuple[int, str]


@dataclass(frozen=True)
class StaticConfig(PolicyConfig):
    """Options of ``static`` (no schedule and no ``every``: every call computes)."""

    name: ClassVar[str] = "static"
    # step or (step, branch) -> action ("step", "cfg", "block:2-6", "attn:0,1" or an Action)
    schedule: Mapping[ScheduleKey, Action | str] = field(default_factory=dict)
    every: int | None = None  # compute every k-th step after warm-up, ``reuse`` in between (None: off)
    reuse: Action | str = "step"  # the action ``every`` runs between computed steps
    warmup: int = 1  # steps before ``every`` starts (>= 0)

    def __post_init__(self) -> None:
        schedule = {} if self.schedule is None else self.schedule
        if not isinstance(schedule, Mapping):
            raise TypeError(f"schedule must be a mapping of step or (step, branch) to action, not {type(schedule).__name__}")
        if self.every is not None and (not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1):
            raise ValueError(f"every must be a positive int, got {self.every!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {self.warmup!r}")
        parsed: dict[ScheduleKey, Action] = {}
        for key, action in schedule.items():
            key = tuple(key) if isinstance(key, list) else key  # a (step, branch) key read back from JSON
            _check_key(key)
            parsed[key] = Action.parse(action)
        self._set("schedule", parsed)
        self._set("reuse", Action.parse(self.reuse))


class StaticPolicy(PolicyBase):
    name = "static"

    def __init__(self, config: StaticConfig | None = None) -> None:
        self.config = config = expect_config(config, StaticConfig)
        self.schedule: dict[ScheduleKey, Action] = dict(config.schedule)
        self.every = config.every
        self.reuse: Action = config.reuse  # type: ignore[assignment]  (normalised in __post_init__)
        self.warmup = config.warmup

    def _scheduled(self, step: int, branch: str) -> Action:
        if (step, branch) in self.schedule:
            return self.schedule[(step, branch)]
        if step in self.schedule:
            return self.schedule[step]
        if self.every and step >= self.warmup and (step - self.warmup) % self.every != 0:
            return self.reuse
        return FULL

    def decide(self, obs: Observation) -> Action:
        return self._scheduled(obs.step, obs.branch)

    def needs(self, model: ModelInfo) -> CacheNeeds:
        """What the scheduled actions read (Note [action table], ``actions.needs_of``)."""
        needs = CacheNeeds()
        for action in [*self.schedule.values(), self.reuse]:
            needs_of(action, needs)
        return needs

    def reset(self) -> None:
        pass


def _check_key(key: object) -> None:
    if isinstance(key, int) and key >= 0:
        return
    if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], int) and key[1] in ("cond", "uncond", "batch"):
        return
    raise ValueError(f"schedule key {key!r} is not a step index or (step, 'cond'|'uncond'|'batch')")
