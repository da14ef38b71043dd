"""Note [action table]: one description per action kind, the only statement of its rules.

For an action on a branch, ``describe`` says what the call runs (``Runs``), what must hold
before it may run (``requires``, in the order the runtime checks them, each with the reason
a fallback records), the caches it reads (``reads``: required ones from ``requires``, plus
optional ones read when present), and what it records (``records``). The runtime's
availability and finiteness checks (``runtime/actions.py``) and its recording
(``runtime/session.py``), ``StaticPolicy.needs`` (through ``needs_of``) and the manifest's
spelling of an action (``spelling``) all read this file and nothing else; the eager
reference of the tests restates it independently.

  kind   runs                             reads                               records
  FULL   every stage                      -                                   output; CFG difference (uncond with
                                                                              cond fresh, or a batch call);
                                                                              needed residuals / attention
  STEP   nothing                          the branch's last output (+ the     -
                                          previous computed one, history=2)
  BLOCK  all but blocks [a, b)            residual of [a, b) of this branch   as FULL, but not the skipped range's
  ATTN   every stage, listed blocks       attention of the listed blocks      as FULL, but not the reused attention
         take cached attention            (last two with history=2)
  CFG    separate uncond: nothing         CFG difference; cond output fresh   the rebuilt output
         batch: the cond half, as its     CFG difference; the *part*'s reads  the rebuilt output; the part's records
         *part* says                      on the cond half                    on the cond half
  PROBE  prologue or first Fn blocks,     the probe's previous value          the probe value; then as the action
         then what after_probe picks                                          after_probe picked

Composite actions (``cfg+block:a-b``, ``cfg+attn:...``) are CFG actions whose computed part
is a BLOCK / ATTN action: their description embeds the part's own description on the cond
half (``COND_HALF``), so they add no rule of their own. On a separate uncond call the part is
moot (that call computes nothing) and the action runs as plain CFG.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass

from .protocol import COND_HALF, Action, ActionKind, CacheNeeds, ModelInfo

BRANCHES = ("cond", "uncond", "batch")


class Cache(str, enum.Enum):
    """The kinds of cached values (names as ``Observation.recorded`` spells them)."""

    OUTPUT = "output"  # the branch's last output (computed, or rebuilt by CFG)
    COMPUTED = "computed"  # the branch's last computed output (history=2)
    OUTPUT_PREV = "output_prev"  # the computed output before that one (history=2)
    DELTA = "delta"  # the CFG difference uncond - cond (one for the whole session)
    RESIDUAL = "residual"  # a block range's residual (index: the range)
    ATTENTION = "attention"  # a block's self-attention output (index: the block)
    ATTENTION_PREV = "attention_prev"  # the one before it (history=2)
    PROBE = "probe"  # the probe's previous value


@dataclass(frozen=True)
class CacheRef:
    """One cached value: its kind, whose branch (None: shared), and which range / block."""

    cache: Cache
    branch: str | None = None
    index: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """``delta``, ``output:cond``, ``residual:cond:2-6``, ``attention:batch.cond:3``."""
        parts = [self.cache.value] + ([self.branch] if self.branch else [])
        if self.index:
            parts.append("-".join(map(str, self.index)))
        return ":".join(parts)


class Runs(str, enum.Enum):
    """What a call runs for its action."""

    NOTHING = "nothing"  # STEP: returns the cached output
    REBUILD = "rebuild"  # CFG on a separate uncond call: cond output + CFG difference
    HALF = "half"  # CFG on a batch call: the cond half as the part says, uncond half rebuilt
    GRAPH = "graph"  # FULL / BLOCK / ATTN: the stage graphs, skipping or swapping what the action reuses
    PROBE = "probe"  # the graph up to the probe point, then what after_probe picks


# ---- requirements: what must hold before an action runs (each with its fallback reason) --------
@dataclass(frozen=True)
class Refused:
    """Never on this branch."""

    reason: str


@dataclass(frozen=True)
class ProbeBefore:
    """After a probe (at ``after_probe``: 0 for a prologue probe, n after n blocks), only when
    the probe point is at most ``limit`` (None: never after a probe)."""

    limit: int | None
    reason: str


@dataclass(frozen=True)
class ModelHas:
    """A property of the planned model (``test`` on its ``ModelInfo``)."""

    test: Callable[[ModelInfo], bool]
    reason: str


@dataclass(frozen=True)
class ProbePoint:
    """The policy declares a probe (``CacheNeeds.probe``) and the model has its probe point;
    the runtime knows both, and gives the reason."""


@dataclass(frozen=True)
class Present:
    """Every listed cache holds a value. ``reason`` may name ``{missing}`` (the missing
    indices)."""

    refs: tuple[CacheRef, ...]
    reason: str


@dataclass(frozen=True)
class Fresh:
    """``ref`` was recorded by a computing call at this step."""

    ref: CacheRef
    reason: str


@dataclass(frozen=True)
class PartOf:
    """A composite action's part, on the cond half: its own requirements, reasons prefixed."""

    spec: ActionSpec
    prefix: str


Requirement = Refused | ProbeBefore | ModelHas | ProbePoint | Present | Fresh | PartOf


@dataclass(frozen=True)
class ActionSpec:
    """What ``action`` does on ``branch`` (see the table above)."""

    action: Action
    branch: str
    runs: Runs
    requires: tuple[Requirement, ...] = ()
    optional_reads: tuple[CacheRef, ...] = ()  # read when present (a missing one is no fallback)
    output: str | None = None  # the output it records: "computed" | "rebuilt" | None
    internals: str | None = None  # whose residuals / attention it records (its part runs on that branch)
    skips: tuple[int, int] | None = None  # the block range replaced by its residual
    reuses_attention: tuple[int, ...] = ()  # blocks fed their cached attention
    part: ActionSpec | None = None  # the computed part of a composite action (on ``internals``)

    @property
    def reads(self) -> tuple[CacheRef, ...]:
        """Every cache the action reads: required ones, optional ones, then its part's."""
        refs: list[CacheRef] = []
        for req in self.requires:
            if isinstance(req, Present):
                refs.extend(req.refs)
            elif isinstance(req, Fresh):
                refs.append(req.ref)
            elif isinstance(req, PartOf):
                refs.extend(req.spec.reads)
        return (*refs, *self.optional_reads)

    @property
    def records_delta(self) -> bool:
        """Whether a computed output of this call refreshes the CFG difference (uncond when
        cond is fresh at this step, or both halves of a batch)."""
        return self.output == "computed" and self.branch in ("uncond", "batch")


def _full(action: Action, branch: str) -> ActionSpec:
    return ActionSpec(action, branch, Runs.GRAPH, output="computed", internals=branch)


def _step(action: Action, branch: str) -> ActionSpec:
    return ActionSpec(
        action, branch, Runs.NOTHING,
        requires=(Present((CacheRef(Cache.OUTPUT, branch),), "no cached output for this branch"),),
        optional_reads=(CacheRef(Cache.COMPUTED, branch), CacheRef(Cache.OUTPUT_PREV, branch)),
    )


def _block(action: Action, branch: str) -> ActionSpec:
    a, e = action.block_range  # type: ignore[misc]
    return ActionSpec(
        action, branch, Runs.GRAPH,
        requires=(
            ModelHas(lambda m: (a, e) in m.reusable_ranges,
                     f"blocks {a}-{e} cannot be skipped (not inside one chain {{chain_bounds}}, or their streams do not pair)"),
            ProbeBefore(a, f"blocks {a}-{e} start before the probe point {{after_probe}}"),
            Present((CacheRef(Cache.RESIDUAL, branch, (a, e)),), f"no cached residual for blocks {a}-{e}"),
        ),
        output="computed", internals=branch, skips=(a, e),
    )


def _attn(action: Action, branch: str) -> ActionSpec:
    blocks = action.attn_blocks
    return ActionSpec(
        action, branch, Runs.GRAPH,
        requires=(
            ProbeBefore(0, "attention reuse cannot follow a blocks probe"),
            ModelHas(lambda m: m.attention_reusable, "the model's blocks have no self-attention cut"),
            ModelHas(lambda m: all(g < m.num_blocks for g in blocks),
                     "attention block index out of range (model has {num_blocks} blocks)"),
            Present(tuple(CacheRef(Cache.ATTENTION, branch, (g,)) for g in blocks), "no cached attention for blocks {missing}"),
        ),
        optional_reads=tuple(CacheRef(Cache.ATTENTION_PREV, branch, (g,)) for g in blocks),
        output="computed", internals=branch, reuses_attention=blocks,
    )


def _cfg(action: Action, branch: str) -> ActionSpec:
    requires: list[Requirement] = [ProbeBefore(None, "CFG reuse cannot follow a probe")]
    if branch == "cond":
        requires.append(Refused("CFG reuse applies to the unconditional branch"))
        return ActionSpec(action, branch, Runs.NOTHING, tuple(requires))
    requires.append(Present((CacheRef(Cache.DELTA),), "no cached CFG difference"))
    if branch != "batch":  # a separate uncond call: the part is moot
        requires.append(Fresh(CacheRef(Cache.OUTPUT, "cond"), "cond branch not computed at this step"))
        return ActionSpec(action, branch, Runs.REBUILD, tuple(requires), output="rebuilt")
    part = describe(action.part, COND_HALF)
    requires.append(ModelHas(lambda m: m.half_batch_available, "half batch unavailable (batch dim not symbolic)"))
    requires.append(PartOf(part, "cond half: "))
    return ActionSpec(action, branch, Runs.HALF, tuple(requires), output="rebuilt", internals=COND_HALF,
                      skips=part.skips, reuses_attention=part.reuses_attention, part=part)


def _probe(action: Action, branch: str) -> ActionSpec:
    return ActionSpec(
        action, branch, Runs.PROBE,
        requires=(ProbeBefore(None, "a probe cannot ask for another probe"), ProbePoint()),
        optional_reads=(CacheRef(Cache.PROBE, branch),),
    )


# Every ActionKind has exactly one entry (tests/policies/test_action_table.py checks it).
RULES: dict[ActionKind, Callable[[Action, str], ActionSpec]] = {
    ActionKind.FULL: _full,
    ActionKind.STEP: _step,
    ActionKind.BLOCK: _block,
    ActionKind.ATTN: _attn,
    ActionKind.CFG: _cfg,
    ActionKind.PROBE: _probe,
}


@functools.lru_cache(maxsize=4096)
def describe(action: Action, branch: str) -> ActionSpec:
    """The description of ``action`` on ``branch`` ("cond", "uncond", "batch" or ``COND_HALF``).
    Cached: a description depends on nothing else."""
    return RULES[action.kind](action, branch)


def needs_of(action: Action, needs: CacheNeeds | None = None) -> CacheNeeds:
    """Add to ``needs`` (a new ``CacheNeeds`` by default) what must be recorded for ``action``
    to find its caches on any branch: derived from what it reads."""
    needs = needs if needs is not None else CacheNeeds()
    for branch in BRANCHES:
        for ref in describe(action, branch).reads:
            if ref.cache is Cache.OUTPUT and ref.branch == branch:
                needs.outputs = True
            elif ref.cache is Cache.DELTA:
                needs.cfg_delta = True
            elif ref.cache is Cache.RESIDUAL:
                needs.ranges.add(ref.index)  # type: ignore[arg-type]
            elif ref.cache is Cache.ATTENTION:
                needs.attn_blocks.add(ref.index[0])
            if ref.branch == COND_HALF:
                needs.cond_half = True
    return needs


def spelling(action: Action) -> str:
    """The ``Action.parse`` spelling: ``full``, ``step``, ``block:1-3``, ``attn:0,2``,
    ``cfg+block:1-3`` (a composite spells its part after ``cfg+``)."""
    if action.composite:
        return f"cfg+{spelling(action.part)}"
    if action.kind is ActionKind.BLOCK:
        return f"block:{action.block_range[0]}-{action.block_range[1]}"  # type: ignore[index]
    if action.kind is ActionKind.ATTN:
        return "attn:" + ",".join(map(str, action.attn_blocks))
    return action.kind.value.lower()


__all__ = [
    "BRANCHES", "Cache", "CacheRef", "Runs", "Refused", "ProbeBefore", "ModelHas", "ProbePoint", "Present", "Fresh",
    "PartOf", "Requirement", "ActionSpec", "RULES", "describe", "needs_of", "spelling",
]
