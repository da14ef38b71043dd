"""The policy protocol: the action vocabulary, what a policy observes, what it asks to keep.

Policies know only this file, never the runtime (dependencies run one way). The runtime
hands a policy an ``Observation`` before every transformer call and runs the ``Action`` it
returns, falling back to ``FULL`` (and recording why) when the action needs a cache that
does not exist. Blocks are numbered globally over all chains (Flux: dual-stream blocks first,
then single-stream), and a block range never crosses from one chain into the next.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class ActionKind(str, enum.Enum):
    FULL = "FULL"  # compute everything
    STEP = "STEP"  # skip the call, reuse this branch's last output
    CFG = "CFG"  # compute the conditional branch only, rebuild the unconditional one
    BLOCK = "BLOCK"  # skip blocks [start, stop), reuse their cached residual
    ATTN = "ATTN"  # reuse the cached self-attention output of the given blocks
    PROBE = "PROBE"  # run the policy's probe (``CacheNeeds.probe``), then ask ``after_probe``


# Note [action table] (``policies/actions.py``): what each action kind runs, reads, records
# and when it is available, stated once there. A CFG action may carry a *part* for the half it
# computes (``cfg+block:a-b``, ``cfg+attn:...``); the cond half of a batch call has its own
# history under the runtime branch ``COND_HALF``.
COND_HALF = "batch.cond"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    block_range: tuple[int, int] | None = None
    attn_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.block_range is not None and self.attn_blocks:
            raise ValueError("an action reuses a block range or attention blocks, not both")
        if self.block_range is not None and self.kind not in (ActionKind.BLOCK, ActionKind.CFG):
            raise ValueError(f"a block range goes with BLOCK or CFG actions, not {self.kind.value}")
        if self.attn_blocks and self.kind not in (ActionKind.ATTN, ActionKind.CFG):
            raise ValueError(f"attention blocks go with ATTN or CFG actions, not {self.kind.value}")

    @property
    def part(self) -> Action:
        """What the computed part of the call runs: the action itself, or for a CFG action the
        cond half's FULL / BLOCK / ATTN (Note [action table])."""
        if self.kind is not ActionKind.CFG:
            return self
        if self.block_range is not None:
            return Action(ActionKind.BLOCK, block_range=self.block_range)
        if self.attn_blocks:
            return Action(ActionKind.ATTN, attn_blocks=self.attn_blocks)
        return FULL

    @property
    def composite(self) -> bool:
        return self.kind is ActionKind.CFG and self.part.kind is not ActionKind.FULL

    def with_cfg(self) -> Action:
        """This action (FULL, BLOCK or ATTN) as the part of a CFG action."""
        if self.kind not in (ActionKind.FULL, ActionKind.BLOCK, ActionKind.ATTN, ActionKind.CFG):
            raise ValueError(f"only FULL, BLOCK or ATTN can be the computed part of a CFG action, not {self.kind.value}")
        return Action(ActionKind.CFG, block_range=self.block_range, attn_blocks=self.attn_blocks)

    def __str__(self) -> str:
        if self.kind is ActionKind.CFG:
            return "CFG" if not self.composite else f"CFG+{self.part}"
        if self.kind is ActionKind.BLOCK and self.block_range:
            return f"BLOCK({self.block_range[0]}-{self.block_range[1]})"
        if self.kind is ActionKind.ATTN:
            return f"ATTN({','.join(map(str, self.attn_blocks))})"
        return self.kind.value

    @staticmethod
    def parse(text: str | Action) -> Action:
        """``"full"``, ``"step"``, ``"cfg"``, ``"block:2-6"`` (blocks 2..5), ``"attn:0,1,2"``,
        and composites ``"cfg+block:2-6"``, ``"cfg+attn:0,1"``."""
        if isinstance(text, Action):
            return text
        if not isinstance(text, str):
            raise TypeError(f"an action is an Action or a string like 'block:2-6', not {type(text).__name__}")
        head, plus, rest = text.strip().partition("+")
        if plus:
            if head.strip().lower() != "cfg":
                raise ValueError(f"a composite action is 'cfg+block:A-B' or 'cfg+attn:I,J', got {text!r}")
            part = Action.parse(rest)
            if part.kind not in (ActionKind.BLOCK, ActionKind.ATTN):
                raise ValueError(f"the part of a composite action is a block or attn action, got {text!r}")
            return part.with_cfg()
        head, _, arg = text.strip().partition(":")
        try:
            kind = ActionKind(head.upper())
        except ValueError:
            valid = ", ".join(k.value.lower() for k in ActionKind)
            raise ValueError(f"unknown action {text!r}; valid kinds: {valid} (and cfg+block:A-B, cfg+attn:I,J)") from None
        if kind is ActionKind.BLOCK:
            start, sep, stop = arg.partition("-")
            if not sep or not start.strip().isdigit() or not stop.strip().isdigit() or int(start) >= int(stop):
                raise ValueError(f"block action needs a range 'block:START-STOP' with START < STOP, got {text!r}")
            return Action(kind, block_range=(int(start), int(stop)))
        if kind is ActionKind.ATTN:
            parts = [p.strip() for p in arg.split(",") if p.strip()]
            if not parts or not all(p.isdigit() for p in parts):
                raise ValueError(f"attn action needs block indices 'attn:0,1,2', got {text!r}")
            return Action(kind, attn_blocks=tuple(sorted({int(p) for p in parts})))
        if arg:
            raise ValueError(f"action {kind.value.lower()} takes no argument, got {text!r}")
        return Action(kind)


FULL = Action(ActionKind.FULL)
PROBE = Action(ActionKind.PROBE)
STEP = Action(ActionKind.STEP)
CFG = Action(ActionKind.CFG)


@dataclass(frozen=True)
class ModelInfo:
    """What a policy may know of the planned model."""

    num_blocks: int
    chain_bounds: tuple[tuple[int, int], ...]  # [start, stop) of each chain in global numbering
    reusable_ranges: frozenset[tuple[int, int]]  # every [start, stop) a BLOCK action may skip
    attention_reusable: bool
    half_batch_available: bool


@dataclass(frozen=True)
class Probe:
    """An indicator computed inside a stage graph, fetched once, handed to ``after_probe``.

    ``kind="blocks"``: rel-L1 change of the residual of the first ``blocks`` blocks (hidden
    stream) against the stored previous one (first-block / DB cache). ``kind="prologue"``:
    rel-L1 change of the timestep-modulation input the prologue hands to the blocks (TeaCache).
    ``update``: replace the stored previous value on every probe ("always") or only when the
    call then computes ("on_compute"). Before any previous value exists the indicator is inf.
    """

    kind: str
    blocks: int = 1
    update: str = "always"

    def __post_init__(self) -> None:
        if self.kind not in ("blocks", "prologue"):
            raise ValueError(f"probe kind must be 'blocks' or 'prologue', got {self.kind!r}")
        if self.update not in ("always", "on_compute"):
            raise ValueError(f"probe update must be 'always' or 'on_compute', got {self.update!r}")
        if self.blocks < 1:
            raise ValueError(f"probe blocks must be >= 1, got {self.blocks}")


@dataclass
class CacheNeeds:
    """What the runtime must record on computed calls so the policy's actions can run.

    ``history=2`` keeps the previous computed output / attention output too (extrapolation).
    ``cond_half=True`` (batched CFG) keeps, for ``ranges`` and ``attn_blocks``, the cond half's
    values too, from full batch calls and from CFG calls (composite ``CFG`` actions read them).
    ``deviations=True`` reports, after each computed call, the rel-L1 change of each freshly
    recorded tensor against its previous fresh copy ("step": output, "cfg": CFG difference,
    "block:a-b": residual), fetched from the device once per call.
    """

    outputs: bool = False
    cfg_delta: bool = False
    ranges: set[tuple[int, int]] = field(default_factory=set)
    attn_blocks: set[int] = field(default_factory=set)
    history: int = 1
    probe: Probe | None = None
    deviations: bool = False
    cond_half: bool = False  # batched CFG: keep the cond half's residuals / attention (composite CFG actions)


@dataclass(frozen=True)
class Recorded:
    """When a cache was last written: at ``step``, by a call that computed it (``computed``;
    False: rebuilt, as CFG rebuilds an uncond output) from calls that all ran in full
    (``exact``: no reused value went into it)."""

    step: int | None
    computed: bool
    exact: bool


@dataclass(frozen=True)
class Observation:
    """Where the denoising loop is, as the runtime knows it, before a call."""

    step: int
    num_steps: int | None
    branch: str  # "cond" | "uncond" | "batch" (both branches in one batch-concatenated call)
    cfg: str  # "separate" | "batched" | "none"
    generation: int
    computed_this_step: frozenset[str]  # branches already computed (not reused) at this step
    # Every cache the runtime holds, by name (``policies/actions.py`` ``CacheRef.name``:
    # "delta", "output:cond", "residual:cond:2-6", "attention:batch.cond:3"), and when it was
    # written. A name absent here has no value (never recorded, or dropped).
    recorded: Mapping[str, Recorded] = field(default_factory=dict)

    def fresh(self, cache: str) -> bool:
        """``cache`` was computed by a call of this step."""
        rec = self.recorded.get(cache)
        return rec is not None and rec.computed and rec.step == self.step

    def exact(self, cache: str) -> bool:
        """``cache`` holds a value computed by calls that all ran in full."""
        rec = self.recorded.get(cache)
        return rec is not None and rec.exact


@dataclass(frozen=True)
class CallReport:
    """What happened on a call, handed to ``policy.observe`` if the policy has it."""

    step: int | None
    branch: str
    action: Action
    fallback: str | None
    indicator: float | None
    deviations: dict[str, float]


@runtime_checkable
class Policy(Protocol):
    """Required: ``name``, ``needs``, ``decide``, ``reset``. The optional hooks
    (``after_probe``, ``observe``, ``reuse_output``, ``reuse_attention``, ``rebuild_uncond``)
    and their defaults are ``policies/base.py`` ``PolicyBase``, which policies derive from; a
    policy that does not is given the defaults for the hooks it lacks (``hooks_of``)."""

    name: str

    def needs(self, model: ModelInfo) -> CacheNeeds: ...

    def decide(self, obs: Observation) -> Action: ...

    def reset(self) -> None: ...
