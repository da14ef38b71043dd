"""Step windows and step counts shared by the policies.

A *window* says at which denoising steps a policy may act. It is given either as a pair of
fractions of the run, ``(a, b)`` meaning steps ``i`` with ``a*T <= i < b*T`` (``T`` = number of
steps), which scales with the run's step count, or as an explicit collection of step indices
(a ``set``, ``frozenset``, ``range`` or ``list`` of ints). A tuple of two numbers is always a
fraction pair; any other collection is a set of steps. ``None`` is the empty window.

Timestep windows as diffusers writes them (``lo < t < hi`` in scheduler timestep units, high =
noisy) depend on the scheduler; ``steps_in_timestep_window`` turns one into the explicit step
set of a given schedule, which is how settings are matched with diffusers' hooks.

When the runtime does not know the step count (``Observation.num_steps is None``: diffusers
pipelines such as WanPipeline and CogVideoXPipeline open ``cache_context`` without
``num_inference_steps``), policies use their ``num_steps`` option, else ``DEFAULT_NUM_STEPS``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from numbers import Real
from typing import Any

# diffusers' default num_inference_steps for the video pipelines this project targets.
DEFAULT_NUM_STEPS = 50
_EPS = 1e-9

WindowSpec = tuple[float, float] | Collection[int] | None


@dataclass(frozen=True)
class StepWindow:
    """A set of steps: fractions ``(a, b)`` of the run, or explicit step indices."""

    fractions: tuple[float, float] | None = None
    steps: frozenset[int] | None = None

    @staticmethod
    def parse(value: Any, name: str) -> StepWindow:
        """Validate a user window (see the module docstring); errors name the option."""
        if isinstance(value, StepWindow):
            return value
        if value is None:
            return StepWindow(steps=frozenset())
        if isinstance(value, tuple) and len(value) == 2 and all(_is_number(v) for v in value):
            a, b = float(value[0]), float(value[1])
            if not (0.0 <= a <= b <= 1.0):
                raise ValueError(f"{name} as fractions (a, b) needs 0 <= a <= b <= 1, got {value!r}")
            return StepWindow(fractions=(a, b))
        if isinstance(value, (set, frozenset, range, list)):
            steps = list(value)
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
                raise ValueError(f"{name} as explicit steps needs non-negative ints, got {value!r}")
            return StepWindow(steps=frozenset(steps))
        raise TypeError(
            f"{name} must be a fraction pair (a, b), a set/range/list of step indices, or None; got {value!r}"
        )

    def contains(self, step: int, num_steps: int) -> bool:
        if self.steps is not None:
            return step in self.steps
        a, b = self.fractions  # type: ignore[misc]
        return a * num_steps - _EPS <= step < b * num_steps - _EPS

    def start(self, num_steps: int) -> int | None:
        """The first step of the window in a run of ``num_steps`` steps (None if empty)."""
        if self.steps is not None:
            return min(self.steps) if self.steps else None
        a, b = self.fractions  # type: ignore[misc]
        first = max(0, math.ceil(a * num_steps - _EPS))
        return first if first < b * num_steps - _EPS and first < num_steps else None

    def is_empty(self) -> bool:
        return self.steps is not None and not self.steps


def window_value(value: Any, name: str) -> tuple[float, float] | frozenset[int] | None:
    """A validated window in the normal form configs store (Note [config normal form]):
    ``None``, a fraction pair of floats, or a frozenset of step indices."""
    if value is None:
        return None
    window = StepWindow.parse(value, name)
    return window.fractions if window.fractions is not None else window.steps


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def resolve_num_steps(observed: int | None, option: int | None) -> int:
    """The step count a policy schedules for: the runtime's, else the option, else 50."""
    if observed is not None and observed > 0:
        return observed
    return option if option is not None else DEFAULT_NUM_STEPS


def check_num_steps(value: Any) -> int | None:
    """Validate a policy's ``num_steps`` option."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"num_steps must be a positive int or None, got {value!r}")
    return value


def steps_in_timestep_window(timesteps: Iterable[Any], lo: float, hi: float) -> frozenset[int]:
    """Steps ``i`` whose timestep satisfies ``lo < t_i < hi`` (diffusers' strict convention)."""
    return frozenset(i for i, t in enumerate(timesteps) if lo < float(t) < hi)


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_float(value: Any, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    if not _is_number(value) or math.isnan(float(value)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
    return value
