"""What the session asks of the runner for one call: the contract between the two.

``GraphRequest``: the action the graph runs (FULL, BLOCK or ATTN, described in
``policies/actions.py``), where the cached residuals / attention it reuses come from, what
to record (``RecordSet``, built once per ``CacheNeeds``), and optionally a probe. The runner
answers ``(outputs, flops, residuals, attention)``: outputs None if a probe decided to reuse
the whole call; the residuals and attention outputs only of ranges / blocks computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from ..policies.protocol import Action, CacheNeeds


class ProbeDecider(Protocol):
    def __call__(self, indicator: torch.Tensor, value: torch.Tensor) -> Action:
        """Given the in-graph indicator (``[num, den]``, a device tensor) and the value it was
        computed from, the action the call continues with."""
        ...


@dataclass(frozen=True)
class ProbeRun:
    """A probe for one call: where (``kind``, after ``blocks`` blocks), the stored previous
    value, and what decides the action once the indicator is known."""

    kind: str
    blocks: int
    previous: torch.Tensor | None
    decide: ProbeDecider


@dataclass(frozen=True)
class RecordSet:
    """Which residuals / attention outputs computed calls record (built once per needs)."""

    ranges: frozenset[tuple[int, int]] = frozenset()
    attn: frozenset[int] = frozenset()

    @staticmethod
    def of(needs: CacheNeeds) -> RecordSet:
        return RecordSet(frozenset(needs.ranges), frozenset(needs.attn_blocks))


NOTHING = RecordSet()


@dataclass(frozen=True)
class ProbedAhead:
    """A call whose prologue probe already ran in the model's entry (runtime/shortcut.py):
    the slot values after the probe group and the FLOPs it ran; the run resumes after it."""

    env: list
    flops: int


@dataclass(frozen=True)
class GraphRequest:
    """One run of the graph. ``residuals(rng)`` / ``attention[g]`` give the cached values the
    action reuses (read only for what it reuses)."""

    action: Action
    branch: str  # whose caches it reads and records ("cond", "uncond", "batch", COND_HALF)
    residuals: Callable[[tuple[int, int]], list[torch.Tensor]]
    attention: Mapping[int, list[torch.Tensor]]
    record: RecordSet = NOTHING
    probe: ProbeRun | None = None
    resume: ProbedAhead | None = None  # the probe group ran ahead: start after it


class OnDemand(dict):
    """A mapping filled on first access (the cached attention a probe's decision asks for)."""

    def __init__(self, fetch: Callable[[int], list[torch.Tensor]]) -> None:
        super().__init__()
        self._fetch = fetch

    def __missing__(self, key: int) -> list[torch.Tensor]:
        value = self[key] = self._fetch(key)
        return value
