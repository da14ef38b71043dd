"""The session's cache records: cached values by ``CacheRef``, their finiteness flags, and
when each was written (``Recorded``, what ``Observation.recorded`` shows a policy).

What a call records is the action's description (``policies/actions.py``: ``output``,
``internals``, ``records_delta``) and what the policy asked to keep (``CacheNeeds``); this
module only stores it. Store keys are ``(prefix, branch, index..., i)`` for the i-th tensor
of a cached list.
"""

from __future__ import annotations

from typing import Any

import torch

from ..policies.actions import Cache, CacheRef
from ..policies.protocol import COND_HALF, CacheNeeds, Recorded
from .cache_store import CacheStore
from .distributed import agree_all
from .host_flags import FiniteFlag

_PREFIX = {
    Cache.OUTPUT: "out", Cache.COMPUTED: "fresh", Cache.OUTPUT_PREV: "fresh_prev", Cache.DELTA: "delta",
    Cache.RESIDUAL: "res", Cache.ATTENTION: "attn", Cache.ATTENTION_PREV: "attn_prev", Cache.PROBE: "probe",
}


def key_prefix(ref: CacheRef) -> tuple:
    return (_PREFIX[ref.cache], *((ref.branch,) if ref.branch else ()), *ref.index)


class CacheRecords:
    """Cached values (owned buffers), their finite flags and their ``Recorded`` stamps."""

    def __init__(self, check_finite: bool) -> None:
        self.store = CacheStore()
        self.check_finite = check_finite
        self.finite: dict[tuple, FiniteFlag] = {}  # Note [finite flags off the per-call path]
        self.recorded: dict[str, Recorded] = {}
        self.needs = CacheNeeds()

    def clear(self) -> None:
        self.store.clear()
        self.finite.clear()
        self.recorded.clear()

    # ---- reading ------------------------------------------------------------------------
    def values(self, ref: CacheRef) -> list[torch.Tensor]:
        prefix, values, i = key_prefix(ref), [], 0
        while (t := self.store.get((*prefix, i))) is not None:
            values.append(t)
            i += 1
        return values

    def get(self, ref: CacheRef, i: int = 0) -> torch.Tensor | None:
        return self.store.get((*key_prefix(ref), i))

    def has(self, ref: CacheRef) -> bool:
        return self.store.has((*key_prefix(ref), 0))

    def fresh(self, ref: CacheRef, step: int | None) -> bool:
        """``ref`` was written by a computing call at ``step``."""
        rec = self.recorded.get(ref.name)
        return rec is not None and rec.computed and rec.step == step

    def all_finite(self, refs: tuple[CacheRef, ...], group: Any) -> bool:
        """Note [non-finite caches]: whether every tensor ``refs`` hold is finite, on every rank
        of ``group`` (Note [rank-consistent decisions]). The probe's previous value is not
        checked here: a non-finite one gives a non-finite indicator, which the probe refuses."""
        refs = tuple(ref for ref in refs if ref.cache is not Cache.PROBE)
        if not refs:
            return True
        ok = True
        for ref in refs:
            prefix = key_prefix(ref)
            if not self.store.has((*prefix, 0)):
                continue
            flag = self.finite.get(prefix)
            if flag is None:  # stored by a path that keeps no flag: compute it now (one read)
                flag = self.finite[prefix] = FiniteFlag(self.values(ref))
            if not flag.all_finite():
                ok = False
                break
        return agree_all(ok, group)

    # ---- writing ------------------------------------------------------------------------
    def put(self, ref: CacheRef, values: list[Any], stamp: Recorded, flag: bool = True) -> None:
        """Store the tensors of ``values`` under ``ref`` (with their finite flag unless
        ``flag`` is False) and stamp it."""
        prefix = key_prefix(ref)
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        for i, v in enumerate(tensors):
            self.store.put((*prefix, i), v)
        if flag and self.check_finite and tensors:
            self.finite[prefix] = FiniteFlag(tensors)
        if tensors:
            self.recorded[ref.name] = stamp

    def rotate(self, current: CacheRef, previous: CacheRef, n: int) -> None:
        """Make ``current``'s n tensors the ``previous`` ones (buffers swap, no copy)."""
        cur, prev = key_prefix(current), key_prefix(previous)
        for i in range(n):
            self.store.rotate((*cur, i), (*prev, i))
        flag = self.finite.pop(cur, None)
        if flag is not None:
            self.finite[prev] = flag
        stamp = self.recorded.pop(current.name, None)
        if stamp is not None:
            self.recorded[previous.name] = stamp

    def record_internal(self, branch: str, new_res: dict, new_attn: dict, stamp: Recorded, deviations: dict | None) -> None:
        """Keep the residuals and attention outputs a call computed, under ``branch``;
        ``deviations``: where to note the residuals' change (None: not noted)."""
        for rng, values in new_res.items():
            ref = CacheRef(Cache.RESIDUAL, branch, rng)
            if deviations is not None:
                self.deviation(deviations, f"block:{rng[0]}-{rng[1]}", values[0], ref)
            self.put(ref, values, stamp)
        for g, values in new_attn.items():
            ref = CacheRef(Cache.ATTENTION, branch, (g,))
            if self.needs.history >= 2:
                self.rotate(ref, CacheRef(Cache.ATTENTION_PREV, branch, (g,)), len(values))
            self.put(ref, values, stamp)

    def record_cond_half(self, part: int, new_res: dict, new_attn: dict, stamp: Recorded) -> None:
        """A full batch call also feeds the cond half's history (Note [action table]). Every
        recorded tensor is batch-first with both halves; one that is not is left out (its
        composite action then falls back for want of a cache, never reading a wrong slice)."""

        def halves(values: list[torch.Tensor]) -> list[torch.Tensor] | None:
            if not all(isinstance(v, torch.Tensor) and v.dim() and v.shape[0] % 2 == 0 for v in values):
                return None
            return [v.chunk(2, dim=0)[part] for v in values]

        res = {rng: h for rng, v in new_res.items() if (h := halves(v)) is not None}
        attn = {g: h for g, v in new_attn.items() if (h := halves(v)) is not None}
        self.record_internal(COND_HALF, res, attn, stamp, None)

    def record_outputs(self, branch: str, outs: list[Any], stamp: Recorded, deltas: list[torch.Tensor] | None,
                       delta_stamp: Recorded | None, deviations: dict) -> None:
        """Keep this branch's output (for STEP and CFG reuse); on computed calls, the last two
        computed outputs (history=2) and ``deltas``, the CFG difference these calls give."""
        needs = self.needs
        if not (needs.outputs or needs.cfg_delta or needs.deviations):
            return
        tensors = [o for o in outs if isinstance(o, torch.Tensor)]
        computed = CacheRef(Cache.COMPUTED, branch)
        if stamp.computed and tensors:
            self.deviation(deviations, "step", tensors[0], computed if needs.history >= 2 else CacheRef(Cache.OUTPUT, branch))
        self.put(CacheRef(Cache.OUTPUT, branch), outs, stamp)
        if stamp.computed and needs.history >= 2:
            self.rotate(computed, CacheRef(Cache.OUTPUT_PREV, branch), len(tensors))
            self.put(computed, outs, stamp)
        if deltas:
            self.deviation(deviations, "cfg", deltas[0], CacheRef(Cache.DELTA))
            self.put(CacheRef(Cache.DELTA), deltas, delta_stamp or stamp)

    def deviation(self, deviations: dict, name: str, new: torch.Tensor, old_ref: CacheRef) -> None:
        """rel-L1 of a freshly recorded tensor against its previous copy (kept on the device;
        all of a call's deviations are fetched together once, after the call)."""
        if not self.needs.deviations:
            return
        old = self.store.get((*key_prefix(old_ref), 0))
        if old is not None and old.shape == new.shape:
            deviations[name] = (new - old).abs().mean() / (old.abs().mean() + 1e-12)
