"""The per-call path over fused stage groups (``passes/fuse.py``).

``StageRunner.run_graph`` hands a call here when the session's needs have a fused plan that
covers the call's action; everything the call does that can be known from the plan and the
call signature is built once: the groups' input getters, output slots, block positions, and
per signature the resolved engine callables with their FLOPs (one table lookup per call,
not one dict key per stage).

Note [fused path equals unfused path]: for every action this runs the same operations in the
same order as ``StageRunner.run_graph`` over the unfused stages (a fused group inlines its
stages' graphs unchanged), fills the same slots at every cut, records the same residuals and
attention outputs, and calls the probe's ``decide`` with the same indicator and value. The
eager-engine tests compare the two paths call by call.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any

import torch

from ..passes.fuse import PROBE_PREV, FusedPlan, Group
from ..policies.protocol import Action, ActionKind
from .distributed import check_same_layout
from .request import GraphRequest, ProbedAhead

_BLOCK, _ATTN, _FULL, _STEP = ActionKind.BLOCK, ActionKind.ATTN, ActionKind.FULL, ActionKind.STEP
_NO_PREVIOUS = (1.0, 0.0)  # indicator [num, den] read as +inf: there is nothing to compare with
_NOTHING: Any = MappingProxyType({})  # no residuals/attention recorded (read-only, shared by all calls)


def _getter(slots: Sequence[int]) -> Callable[[list[Any]], tuple[Any, ...]]:
    """``env -> tuple(env[s] for s in slots)`` at C speed (itemgetter of one item is not a tuple)."""
    if len(slots) == 1:
        only = slots[0]
        return lambda env: (env[only],)
    if not slots:
        return lambda env: ()
    return operator.itemgetter(*slots)


class _GroupRun:
    """What the per-call loop needs of one group, precomputed."""

    __slots__ = ("stage", "args_of", "outputs", "first_block", "last_block", "single", "probe_stage", "probe_args", "probe_n")

    def __init__(self, group: Group, single: Any) -> None:
        self.stage = group.stage
        self.args_of = _getter(group.stage.inputs)
        self.outputs = tuple(group.stage.outputs)
        self.first_block = group.first_block
        self.last_block = group.last_block
        self.single = single  # the BlockStage when the group is exactly one block
        self.probe_stage = group.probe_stage
        if group.probe_stage is not None:
            inputs = group.probe_stage.inputs
            self.probe_args = (_getter([s for s in inputs if s != PROBE_PREV]), inputs.index(PROBE_PREV))
            self.probe_n = len(group.stage.outputs)


class FusedPath:
    """Runs calls over one ``FusedPlan``; built once per (runner, needs)."""

    def __init__(self, runner: Any, fused: FusedPlan, declared_ranges: frozenset[tuple[int, int]] = frozenset()) -> None:
        self.fused = fused
        # Ranges the policy declared; only the reusable ones (``fused.ranges``) are recorded.
        self.declared_ranges = declared_ranges | fused.ranges
        blocks = runner.blocks
        self.runs = [
            _GroupRun(g, blocks[g.first_block] if g.stop - g.start == 1 and g.first_block is not None else None)
            for g in fused.groups
        ]
        self.num_stages = len(self.runs)
        self.ranges = fused.ranges
        self.attn = fused.attn_blocks
        self.probe_key = (fused.probe.kind, fused.probe.blocks) if fused.probe is not None else None
        # block g -> index of the group that starts right after it (where a skip ending at g resumes)
        self.resume_after = {
            g.last_block: i + 1 for i, g in enumerate(fused.groups) if g.last_block is not None
        }
        plan = runner.plan
        self.num_slots = fused.num_slots  # a split prologue adds slots (passes/probe_split.py)
        self.num_inputs = len(plan.placeholders)
        spec = plan.output_spec
        if all(plan.output_is_slot):
            self.outputs_of = _getter(spec)
        else:
            self.outputs_of = lambda env: tuple(env[s] if is_slot else s for s, is_slot in zip(spec, plan.output_is_slot))
        self.direct = self._direct_outputs(plan, fused)
        self.probe_ahead_inputs = self._probe_ahead_inputs()
        self._tables: dict[int, list[Any]] = {}  # signature id -> per group (fn, flops) or None
        self._probe_tables: dict[int, Any] = {}
        self._zero_prev: dict[int, torch.Tensor] = {}

    @staticmethod
    def _direct_outputs(plan: Any, fused: FusedPlan) -> Callable[[Sequence[Any]], tuple[Any, ...]] | None:
        """For a one-graph plan that takes the call's arguments as they are: the function
        picking the call's outputs from the graph's outputs (no value table at all)."""
        if len(fused.groups) != 1 or fused.groups[0].stage.inputs != list(range(len(plan.placeholders))):
            return None
        outputs = fused.groups[0].stage.outputs
        if not all(plan.output_is_slot):
            return None
        return _getter([outputs.index(s) for s in plan.output_spec])

    def _probe_ahead_inputs(self) -> tuple[int, ...] | None:
        """The graph inputs (placeholder indices) the first group's probe variant reads, if the
        first group is a prologue probe group reading graph inputs only: then the probe can run
        in the model's entry, before Dynamo (``probe_ahead``). Else None. (Built once.)"""
        first = self.runs[0]
        if first.probe_stage is None or first.first_block is not None or self.probe_key is None or self.probe_key[0] != "prologue":
            return None
        slots = [s for s in first.probe_stage.inputs if s != PROBE_PREV]
        return tuple(slots) if all(0 <= s < self.num_inputs for s in slots) else None

    def probe_ahead(self, runner: Any, sig: int, inputs: dict[int, Any], probe: Any) -> tuple[Action, ProbedAhead]:
        """Run the first group's probe on ``inputs`` (graph inputs by placeholder index): the
        action ``probe.decide`` picks and what a resumed run (``run`` with ``resume``) needs."""
        env: list[Any] = [None] * self.num_slots
        for slot, value in inputs.items():
            env[slot] = value
        decided, flops = self._probe(runner, self.runs[0], env, sig, probe)
        return decided, ProbedAhead(env, flops)

    def accepts(self, request: GraphRequest) -> bool:
        """Whether every cut this call reads is kept (else the unfused path runs it)."""
        action, probe = request.action, request.probe
        record_ranges, record_attn = request.record.ranges, request.record.attn
        if record_ranges and not record_ranges <= self.declared_ranges:
            return False
        if record_attn and not record_attn <= self.attn:
            return False
        if probe is not None and (probe.kind, probe.blocks) != self.probe_key:
            return False
        kind = action.kind
        if kind is _FULL:
            return True
        if kind is _BLOCK:
            return action.block_range in self.ranges
        if kind is _ATTN:
            return self.attn.issuperset(action.attn_blocks)
        return False

    def _resolve(self, runner: Any, sig: int, i: int, stage: Any, args: Sequence[Any]) -> tuple[Any, int]:
        table = self._tables.get(sig)
        if table is None:
            table = self._tables[sig] = [None] * self.num_stages
        hit = table[i]
        if hit is None:
            hit = table[i] = (runner.engine.get(stage, args), runner.stage_flops(stage, args))
        return hit

    def run(self, runner: Any, args: Sequence[Any], sig: int, request: GraphRequest) -> tuple[tuple[Any, ...] | None, int, dict, dict]:
        """``StageRunner.run_graph`` over the groups (same arguments, same results)."""
        action, residuals, cached_attn, probe = request.action, request.residuals, request.attention, request.probe
        record_ranges, record_attn = request.record.ranges, request.record.attn
        if self.direct is not None:  # one graph: ``accepts`` let only FULL calls without probe in
            fn, flops = self._resolve(runner, sig, 0, self.runs[0].stage, args)
            return self.direct(fn(*args)), flops, _NOTHING, _NOTHING
        resume = request.resume
        # Resumed (the probe group ran in the model's entry, ``probe_ahead``): the first group's
        # outputs are in its env, the action is the one the probe decided.
        env: list[Any] = resume.env if resume is not None else [None] * self.num_slots
        env[: len(args)] = args
        blocks = runner.blocks
        skip = action.block_range if action.kind is _BLOCK else None
        reuse_attn = action.attn_blocks if action.kind is _ATTN else ()
        range_inputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        new_res: dict[tuple[int, int], list[torch.Tensor]] = {}
        new_attn: dict[int, list[torch.Tensor]] = {}
        flops = resume.flops if resume is not None else 0
        runs, i, n = self.runs, (1 if resume is not None else 0), self.num_stages
        while i < n:
            run = runs[i]
            first = run.first_block
            if first is not None:
                if skip is not None and first == skip[0]:
                    last = blocks[skip[1] - 1]
                    stream_in = blocks[first].stream_in
                    for (j, dst), res in zip(last.stream_map, residuals(skip)):
                        live = env[stream_in[j]]
                        check_same_layout(live, res, f"residual of blocks {skip[0]}-{skip[1]}")  # Note [shard-local caches]
                        env[dst] = live + res
                    i = self.resume_after[skip[1] - 1]
                    continue
                for rng in record_ranges:
                    if rng[0] == first and rng in self.ranges:
                        range_inputs[rng] = [env[s] for s in blocks[first].stream_in]
            if run.single is not None and first in reuse_attn:
                flops += self._attention_reused(runner, run.single, env, sig, cached_attn[first])
            elif probe is not None and run.probe_stage is not None:
                decided, f = self._probe(runner, run, env, sig, probe)
                flops += f
                probe = None
                if decided.kind is _STEP:
                    return None, flops, new_res, new_attn
                skip = decided.block_range if decided.kind is _BLOCK else None
                if skip is not None and skip not in self.ranges:  # needs declare every range a probe may pick
                    raise RuntimeError(f"mixcache: the probe chose blocks {skip}, which this fused plan cannot skip")
                if decided.kind is _ATTN:  # a prologue probe may pick attention reuse for the blocks after it
                    if not self.attn.issuperset(decided.attn_blocks):
                        raise RuntimeError(f"mixcache: the probe chose attention of blocks {decided.attn_blocks}, which this fused plan cannot swap")
                    reuse_attn = decided.attn_blocks
            else:
                stage_args = run.args_of(env)
                fn, f = self._resolve(runner, sig, i, run.stage, stage_args)
                outs = fn(*stage_args)
                for slot, value in zip(run.outputs, outs):
                    env[slot] = value
                flops += f
            if run.single is not None and first in record_attn and first not in reuse_attn:
                # only attention this call computed is recorded (a reused one is not fresh)
                new_attn[first] = [env[s] for s in run.single.attn_out]
            last_block = run.last_block
            if last_block is not None and range_inputs:
                for rng, inputs in range_inputs.items():
                    if rng[1] - 1 == last_block:
                        new_res[rng] = [env[dst] - inputs[j] for j, dst in blocks[last_block].stream_map]
            i += 1
        return self.outputs_of(env), flops, new_res, new_attn

    def _attention_reused(self, runner: Any, block: Any, env: list[Any], sig: int, cached: list[torch.Tensor]) -> int:
        for j, slot in enumerate(block.attn_out):
            env[slot] = cached[j]
        variant = block.attn_reused
        return runner._stage(variant, env, sig, [env[s] for s in variant.inputs] + list(cached))[1]

    def _probe(self, runner: Any, run: _GroupRun, env: list[Any], sig: int, probe: Any) -> tuple[Action, int]:
        """Run the group's indicator variant; ``probe.decide`` gets the in-graph indicator
        (+inf without a stored previous value) and the value it was computed from."""
        stage = run.probe_stage
        getter, prev_at = run.probe_args
        stage_args = list(getter(env))
        previous = probe.previous
        stand_in = self._zeros_like_value(runner, run, env, sig)
        if previous is None:
            previous = stand_in
        else:  # Note [shard-local caches]: the stand-in has the live value's shape
            check_same_layout(stand_in, previous, "previous probe value")
        stage_args.insert(prev_at, previous)
        hit = self._probe_tables.get(sig)
        if hit is None or hit[0] is not stage:
            hit = self._probe_tables[sig] = (stage, runner.engine.get(stage, stage_args), runner.stage_flops(stage, stage_args))
        outs = hit[1](*stage_args)
        n = run.probe_n
        for slot, value in zip(stage.outputs[:n], outs):
            env[slot] = value
        value = outs[n] if probe.kind == "blocks" else env[runner.plan.modulation_slot]
        indicator = outs[-1] if probe.previous is not None else torch.tensor(_NO_PREVIOUS)
        return probe.decide(indicator, value), hit[2]

    def _zeros_like_value(self, runner: Any, run: _GroupRun, env: list[Any], sig: int) -> torch.Tensor:
        """A stand-in previous value for the first probe of a signature, so the first call runs
        the same compiled variant as the others (its indicator is then ignored)."""
        zeros = self._zero_prev.get(sig)
        if zeros is None:
            plain_args = list(run.args_of(env))
            fakes = runner._fake_outputs(run.stage, plain_args)
            if self.probe_key[0] == "blocks":
                hidden = dict(runner.blocks[self.probe_key[1] - 1].stream_map)[0]
                fake = fakes[run.outputs.index(hidden)]
            else:
                fake = fakes[run.outputs.index(runner.plan.modulation_slot)]
            zeros = torch.zeros(fake.shape, dtype=fake.dtype, device=fake.device)
            self._zero_prev[sig] = zeros
        return zeros
