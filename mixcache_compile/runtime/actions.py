"""Whether an action can run now: the requirements of its description (``policies/actions.py``,
Note [action table]) checked against the session's cache records and the planned model.

Nothing here knows an action kind: every rule is in the description, this only evaluates
its requirement types. A composite action's part is checked as its own description on the
cond half (``PartOf``), so composites need nothing of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..policies.actions import ActionSpec, Fresh, ModelHas, PartOf, Present, ProbeBefore, ProbePoint, Refused, Requirement
from ..policies.protocol import ModelInfo
from .records import CacheRecords


@dataclass(frozen=True)
class Situation:
    """What the requirements are checked against, for one call."""

    records: CacheRecords
    model: ModelInfo
    step: int | None
    after_probe: int | None  # None: no probe ran; 0: after a prologue probe; n: after n blocks
    probe_point: Callable[[], str | None]  # why the policy's probe cannot run, or None


def refusal(spec: ActionSpec, now: Situation) -> str | None:
    """The first requirement of ``spec`` that does not hold, as the reason a fallback records."""
    for req in spec.requires:
        reason = _check(req, now)
        if reason is not None:
            return reason
    return None


def _check(req: Requirement, now: Situation) -> str | None:
    if isinstance(req, Refused):
        return req.reason
    if isinstance(req, ProbeBefore):
        ok = now.after_probe is None or (req.limit is not None and now.after_probe <= req.limit)
        return None if ok else req.reason.format(after_probe=now.after_probe)
    if isinstance(req, ModelHas):
        model = now.model
        return None if req.test(model) else req.reason.format(chain_bounds=model.chain_bounds, num_blocks=model.num_blocks)
    if isinstance(req, ProbePoint):
        return now.probe_point()
    if isinstance(req, Present):
        missing = [ref for ref in req.refs if not now.records.has(ref)]
        return req.reason.format(missing=[ref.index[0] for ref in missing if ref.index]) if missing else None
    if isinstance(req, Fresh):
        return None if now.records.fresh(req.ref, now.step) else req.reason
    if isinstance(req, PartOf):
        reason = refusal(req.spec, now)
        return None if reason is None else req.prefix + reason
    raise TypeError(f"unknown requirement {req!r}")
