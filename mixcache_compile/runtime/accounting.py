"""The session's statistics and decision trace: what each call ran, cost and fell back from.

``Accounting.account`` is called once per call, after it ran; ``stats()`` reads the counters
(``CacheSession.stats`` adds what only the session knows: caches, trace, stage count).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..policies.protocol import FULL, Action, ActionKind, CallReport, Observation
from .context import CallPosition
from .distributed import reduce_mean
from .trace_log import TraceLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceEntry:
    """One decision: which call, what the policy asked, what ran and why if it differs."""

    generation: int
    step: int | None
    branch: str
    action: str
    requested: str
    fallback: str | None = None
    indicator: float | None = None


@dataclass
class Call:
    """The decision state of the call in progress (a probe may change it mid-call)."""

    pos: CallPosition
    obs: Observation | None
    requested: Action = FULL
    action: Action = FULL
    reason: str | None = None
    indicator: float | None = None
    deviations: dict[str, torch.Tensor] = field(default_factory=dict)


class Accounting:
    """Counters since the last ``reset``; the trace lives with the session."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.flops_run = 0
        self.flops_full = 0
        self.actions: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.non_finite = 0
        self.flop_notes: dict[str, Any] = {}
        self.bypassed_calls = 0

    def stats(self) -> dict[str, Any]:
        run, full = self.flops_run, self.flops_full
        return {
            "calls": self.calls,
            "computed_fraction": run / full if full else 1.0,
            "flops_run": run,
            "flops_full": full,
            "actions": dict(self.actions),
            "fallbacks": dict(self.fallbacks),
            "non_finite": self.non_finite,
            # Calls under torch.compile that never reached this session (Note [bypass detector]).
            "bypassed_calls": self.bypassed_calls,
            # Note [accounting never breaks a call]: stages not counted on fake tensors.
            "flops_unknown": {n: r.note for n, r in self.flop_notes.items() if r.flops is None},
            "flops_from_real_tensors": sorted(n for n, r in self.flop_notes.items() if r.flops is not None),
        }

    def account(self, call: Call, flops: int, full_flops: int, flop_notes: dict, generation: int,
                trace: TraceLog[TraceEntry], group: Any) -> CallReport:
        """Count the call, trace it, and return the report for the policy's ``observe``
        (its deviations fetched from the device together, once)."""
        action, requested, reason, pos = call.action, call.requested, call.reason, call.pos
        self.calls += 1
        self.flops_run += flops
        self.flops_full += full_flops
        if flop_notes:
            self.flop_notes.update(flop_notes)
        self.actions[action.kind.value] += 1
        if reason:
            self.fallbacks[reason] += 1
            if requested.kind is not ActionKind.FULL:
                log.info("step %s %s: %s -> FULL (%s)", pos.step, pos.branch, requested, reason)
        trace.append(TraceEntry(generation, pos.step, pos.branch, str(action), str(requested), reason, call.indicator))
        names = list(call.deviations)
        values = reduce_mean(torch.stack([call.deviations[n].float() for n in names]), group).tolist() if names else []
        return CallReport(pos.step, pos.branch, action, reason, call.indicator, dict(zip(names, values)))
