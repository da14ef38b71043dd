"""The policy protocol: the action vocabulary, what a policy observes, what it asks to keep.

Policies know only this file, never the runtime (dependencies run one way). The runtime
hands a policy an ``Observation`` before every transformer call and runs the ``Action`` it
returns, falling back to ``FULL`` (and recording why) when the action needs a cache that
does not exist. Blocks are numbered globally over all chains (Flux: dual-stream blocks first,
then single-stream), and a block range never crosses from one chain into the next.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class ActionKind(str, enum.Enum):
    FULL = "FULL"  # compute everything
    STEP = "STEP"  # skip the call, reuse this branch's last output
    CFG = "CFG"  # compute the conditional branch only, rebuild the unconditional one
    BLOCK = "BLOCK"  # skip blocks [start, stop), reuse their cached residual
    ATTN = "ATTN"  # reuse the cached self-attention output of the given blocks


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    block_range: tuple[int, int] | None = None
    attn_blocks: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind is ActionKind.BLOCK and self.block_range:
            return f"BLOCK({self.block_range[0]}-{self.block_range[1]})"
        if self.kind is ActionKind.ATTN:
            return f"ATTN({','.join(map(str, self.attn_blocks))})"
        return self.kind.value

    @staticmethod
    def parse(text: str | Action) -> Action:
        """``"full"``, ``"step"``, ``"cfg"``, ``"block:2-6"`` (blocks 2..5), ``"attn:0,1,2"``."""
        if isinstance(text, Action):
            return text
        if not isinstance(text, str):
            raise TypeError(f"an action is an Action or a string like 'block:2-6', not {type(text).__name__}")
        head, _, arg = text.strip().partition(":")
        try:
            kind = ActionKind(head.upper())
        except ValueError:
            valid = ", ".join(k.value.lower() for k in ActionKind)
            raise ValueError(f"unknown action {text!r}; valid kinds: {valid}") from None
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


@dataclass
class CacheNeeds:
    """What the runtime must record on computed calls so the policy's actions can run."""

    outputs: bool = False
    cfg_delta: bool = False
    ranges: set[tuple[int, int]] = field(default_factory=set)
    attn_blocks: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Observation:
    """Where the denoising loop is, as the runtime knows it, before a call."""

    step: int
    num_steps: int | None
    branch: str  # "cond" | "uncond" | "batch" (both branches in one batch-concatenated call)
    cfg: str  # "separate" | "batched" | "none"
    generation: int
    computed_this_step: frozenset[str]  # branches already computed (not reused) at this step


@runtime_checkable
class Policy(Protocol):
    name: str

    def needs(self, model: ModelInfo) -> CacheNeeds: ...

    def decide(self, obs: Observation) -> Action: ...

    def reset(self) -> None: ...
