"""FLOPs of a stage call, counted once per stage graph and input signature.

Note [accounting never breaks a call]: FLOP counting is bookkeeping for ``stats()``; it
must never make a call fail or change what it returns. So, for each stage:
  1. count on fake tensors under ``FlopCounterMode`` (no real compute, independent of the
     engine that runs the stage for real);
  2. if that fails (a data-dependent op such as ``nonzero`` or boolean-mask indexing has no
     fake output shape), count once on the call's real tensors with the eager stage graph:
     exact for that call; a later call whose data changes the shapes may differ;
  3. if that fails too, or no real tensors are at hand, the count is unknown: the stage
     counts 0 and the reason is kept, and ``stats()["flops_unknown"]`` names it.

Note [autograd-free counting]: every input is detached and counting runs under
``no_grad``. ``FlopCounterMode`` tracks modules with autograd hooks on inputs that require
grad, which fails on the inference tensors of a call under ``torch.inference_mode()``
("'NoneType' object has no attribute 'next_functions'"). With no input requiring grad that
tracker never touches autograd, so counting works the same under inference_mode, no_grad
and grad enabled, and builds no autograd graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ..passes.stage_graph import StageGraph

log = logging.getLogger(__name__)

FAKE, REAL, UNKNOWN = "fake", "real", "unknown"


@dataclass(frozen=True)
class StageFlops:
    """The count of one stage call. ``flops`` is None when unknown; ``note`` says why it was
    not counted on fake tensors (method ``real``) or not at all (method ``unknown``)."""

    flops: int | None
    method: str
    note: str | None = None
    outputs: tuple[Any, ...] | None = None  # the counted run's outputs (fake or real)


def _detached(args: Sequence[Any]) -> list[Any]:
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def _why(err: BaseException) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first_line}"[:200]


def _run_counted(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[int, tuple[Any, ...]]:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        outs = fn(*args)
    return int(counter.get_total_flops()), tuple(outs)


def measure_flops(stage: StageGraph, args: Sequence[Any], mode: FakeTensorMode | None = None) -> StageFlops:
    """Count one call of ``stage`` on ``args`` (Note [accounting never breaks a call]).
    ``mode``: the fake mode to convert real inputs in (one per graph walk, so fakes of one
    walk share it); a fresh one by default."""
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    try:
        fakes = [a if isinstance(a, FakeTensor) else mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                 for a in _detached(args)]
        with mode:
            flops, outs = _run_counted(stage.gm, fakes)
        return StageFlops(flops, FAKE, outputs=outs)
    except Exception as err:  # noqa: BLE001 - Note [accounting never breaks a call]
        fake_error = _why(err)
    if any(isinstance(a, FakeTensor) for a in args):
        return StageFlops(None, UNKNOWN, f"not countable on fake tensors ({fake_error}) and no real inputs at hand")
    try:
        flops, outs = _run_counted(stage.gm, _detached(args))
    except Exception as err:  # noqa: BLE001
        return StageFlops(None, UNKNOWN, f"not countable on fake tensors ({fake_error}) nor on real ones ({_why(err)})")
    log.info("mixcache: stage %s counted on real tensors (%s)", stage.name, fake_error)
    return StageFlops(flops, REAL, f"counted on the first call's real tensors ({fake_error})", outs)


def count_flops(stage: StageGraph, args: Sequence[Any]) -> int:
    """FLOPs of ``stage`` on ``args``; raises ``RuntimeError`` naming why when they cannot be
    known (for callers that need a number, e.g. an export manifest)."""
    result = measure_flops(stage, args)
    if result.flops is None:
        raise RuntimeError(f"FLOPs of stage {stage.name!r} cannot be counted: {result.note}")
    return result.flops


def graph_flops(stages: Sequence[StageGraph], num_slots: int, args: Sequence[Any],
                known: dict[str, int]) -> tuple[int, dict[str, StageFlops]]:
    """FLOPs of computing every stage in order on the graph inputs ``args`` (the full call),
    and the count of each stage not counted on fake tensors (by stage name, without
    outputs). ``known``: counts already taken, by stage name. The walk runs on fake tensors;
    if a stage cannot run on fakes (a data-dependent op), the walk is redone once on real
    tensors with the eager stage graphs (one eager forward per input signature)."""
    total, odd, complete = _walk(stages, num_slots, args, known, FakeTensorMode(allow_non_fake_inputs=True))
    if complete:
        return total, odd
    try:
        real_total, counted, _ = _walk(stages, num_slots, _detached(args), known, None)
    except Exception as err:  # noqa: BLE001 - Note [accounting never breaks a call]
        why = f"the real-tensor walk failed too ({_why(err)}): the full-call FLOPs are a lower bound"
        return total, {name: StageFlops(None, UNKNOWN, f"{r.note}; {why}") for name, r in odd.items()}
    note = "counted on the first call's real tensors (not countable on fake tensors)"
    return real_total, {name: StageFlops(counted[name].flops, REAL, note) for name in odd}


def _walk(stages: Sequence[StageGraph], num_slots: int, args: Sequence[Any], known: dict[str, int],
          mode: FakeTensorMode | None) -> tuple[int, dict[str, StageFlops], bool]:
    """One pass over ``stages``: on fakes when ``mode`` is given, else on real tensors
    (which raises if a stage fails: the caller then keeps the fake pass's partial result).
    Returns the total, the stages not counted on fakes (on real tensors: every stage), and
    whether every stage was counted on fakes."""
    env: list[Any] = [None] * num_slots
    env[: len(args)] = args
    total, odd, complete = 0, {}, True
    for stage in stages:
        stage_args = [env[i] for i in stage.inputs]
        if mode is None:
            flops, outs = _run_counted(stage.gm, stage_args)
            total += known.get(stage.name, flops)
            odd[stage.name] = StageFlops(flops, REAL)
            for slot, value in zip(stage.outputs, outs):
                env[slot] = value
            continue
        if any(a is None for a in stage_args):
            odd[stage.name] = StageFlops(None, UNKNOWN, "not counted: an earlier stage's outputs are unknown")
            complete = False
            continue
        result = measure_flops(stage, stage_args, mode)
        if result.method != FAKE:
            complete = False
            odd[stage.name] = StageFlops(result.flops, result.method, result.note)
        total += known.get(stage.name, result.flops or 0)
        for slot, value in zip(stage.outputs, result.outputs or ()):
            env[slot] = value
    return total, odd, complete
