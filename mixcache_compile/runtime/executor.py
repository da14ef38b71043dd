"""The callable the backend returns: runs the stage graphs an action needs, call by call.

The session decides what a call runs (``request.py``: a ``GraphRequest``), between stage
calls, never inside a compiled graph; a probe's decision comes mid-graph, at its probe
point. What an action skips or swaps is its description (``policies/actions.py``). Every
value of the original graph has a slot; a stage reads its input slots and fills its output slots.
Skipping a block range fills the range's stream outputs from its stream inputs plus the
cached residual; reusing attention feeds the cached attention output to the block variant
that takes it as an input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..engines.base import Engine
from ..passes.fuse import ProbePoint, fuse_plan, stage_units
from ..passes.plan import BlockStage, StagePlan, range_ok
from ..passes.stage_graph import StageGraph
from ..policies.actions import Runs, describe
from ..policies.protocol import Action, ActionKind, ModelInfo
from .distributed import check_same_layout
from .entry import note_reached
from .flops import FAKE, StageFlops, graph_flops, measure_flops
from .fused_runner import FusedPath
from .inputs import InputInfo
from .request import GraphRequest, ProbeRun, RecordSet

log = logging.getLogger(__name__)


class StageRunner:
    """Runs one planned graph under a session. Holds no cache state itself (the session does).

    Extension points (an exported model's runner, ``export/runtime.py``, uses them): the
    plan's ``probe_variants`` (given instead of built from graphs), ``stage_flops`` (FLOPs of
    one stage call) and ``count_full_flops`` (FLOPs of a whole call computed in full)."""

    fuse: bool = True  # False: always run the unfused stages (the reference path)

    def __init__(self, plan: StagePlan, engine: Engine, inputs: InputInfo, session: Any, model_key: int = 0) -> None:
        self.plan = plan
        self.model_key = model_key  # identity of the model's parameters: one session, one model
        self.engine = engine
        self.inputs = inputs
        self.session = session
        self.blocks: list[BlockStage] = plan.blocks()
        # The one walk over the plan (passes/fuse.py ``stage_units``): execution, FLOP
        # accounting, fusion and export all follow this sequence.
        self.units = stage_units(plan)
        self.block_unit = [i for i, u in enumerate(self.units) if u.kind == "block"]
        bounds, start = [], 0
        for chain in plan.chains:
            bounds.append((start, start + len(chain)))
            start += len(chain)
        self.chain_bounds = tuple(bounds)
        self.model_info = ModelInfo(
            num_blocks=len(self.blocks),
            chain_bounds=self.chain_bounds,
            reusable_ranges=frozenset(
                (a, b) for a in range(len(self.blocks)) for b in range(a + 1, len(self.blocks) + 1) if range_ok(self.blocks, a, b)
            ),
            attention_reusable=all(b.attn_reused is not None for b in self.blocks),
            half_batch_available=inputs.batch_symbolic and bool(inputs.batch_inputs),
        )
        self._resolved: dict[tuple, tuple[Any, int]] = {}
        self._full_flops: dict[int, int] = {}  # signature id -> FLOPs of a full call
        self._signature_ids: dict[tuple, int] = {}
        # Stages whose FLOPs were not counted on fake tensors, by name (read by stats()).
        self.flop_notes: dict[str, StageFlops] = {}
        self._needs: Any = None
        self._fused: FusedPath | None = None
        self._fused_built = False
        # Where Dynamo took each graph input from (``L['kwargs']['timestep']``, ...), and
        # whether a frame traced into this graph changes state outside it: what the model's
        # entry needs to answer calls without Dynamo (runtime/shortcut.py, Note [answered ahead]).
        self.arg_sources: list[str] | None = _sources(plan.placeholders)
        self.frame_side_effects = False

    # ---- stage fusion by need (passes/fuse.py) --------------------------------------------
    def set_needs(self, needs: Any) -> None:
        """The session's needs changed (it asked the policy again): fuse for them anew."""
        self._needs = needs
        self._fused, self._fused_built = None, False

    def fused_path(self) -> FusedPath | None:
        """The fused groups for the session's current needs, built on first use."""
        if not self.fuse:
            return None
        if not self._fused_built:
            self._fused, self._fused_built = self._build_fused(self._needs), True
        return self._fused

    def _build_fused(self, needs: Any) -> FusedPath | None:
        if needs is None or any(u.stage.gm is None for u in self.units):
            return None  # stages without graphs (an exported manifest) cannot be fused
        probe = needs.probe
        point = ProbePoint(probe.kind, probe.blocks) if probe is not None else None
        if point is not None and self.probe_available(point.kind, point.blocks) is not None:
            point = None  # the session refuses this probe: no cut for it
        ranges = {r for r in needs.ranges if r in self.model_info.reusable_ranges}
        attn = {g for g in needs.attn_blocks if 0 <= g < len(self.blocks)} if self.model_info.attention_reusable else set()
        fused = fuse_plan(self.plan, ranges, attn, point)
        log.info("mixcache: %d stage(s) for policy %r (of %d unfused; cuts before units %s)",
                 fused.num_stages, self.session.policy.name, len(fused.units), sorted(fused.cuts))
        return FusedPath(self, fused, frozenset(needs.ranges))

    def stage_count(self) -> int:
        """Stage graphs a full call runs: the fused count under the current needs."""
        path = self.fused_path()
        return path.num_stages if path is not None else len(self.units)

    def intern(self, signature: tuple) -> int:
        """A small int for a call signature, so the per-stage lookups of the hot path hash an
        int instead of a nested tuple of shapes."""
        return self._signature_ids.setdefault(signature, len(self._signature_ids))

    def probe_available(self, kind: str, blocks: int) -> str | None:
        """Why a probe cannot run on this model, or None."""
        return self.plan.probe_refusal(kind, blocks)

    # ---- FLOPs (extension points) ----------------------------------------------------------
    def stage_flops(self, stage: StageGraph, args: Sequence[Any]) -> int:
        """FLOPs of one call of ``stage`` on ``args`` (asked once per stage and signature).
        Note [accounting never breaks a call]: an uncountable stage counts 0 and says why."""
        result = measure_flops(stage, args)
        if result.method != FAKE:
            self.flop_notes[stage.name] = StageFlops(result.flops, result.method, result.note)
        return result.flops or 0

    def count_full_flops(self, args: Sequence[Any], sig: int) -> int:
        """FLOPs of computing a call on ``args`` in full: every unit of the walk."""
        stages = [u.stage for u in self.units]
        known = {s.name: self._resolved[(s.name, sig)][1] for s in stages if (s.name, sig) in self._resolved}
        total, odd = graph_flops(stages, self.plan.num_slots, args, known)
        for name, result in odd.items():
            self.flop_notes.setdefault(name, result)
        return total

    def known_full_flops(self, sig: int) -> int | None:
        """FLOPs of a full call of signature ``sig`` if already known (no arguments needed)."""
        return self._full_flops.get(sig)

    def full_flops(self, args: Sequence[Any], sig: int) -> int:
        """FLOPs of computing this call in full (the denominator of ``computed_fraction``):
        known from a full run of this signature, else counted once."""
        if sig not in self._full_flops:
            self._full_flops[sig] = self.count_full_flops(args, sig)
        return self._full_flops[sig]

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        outputs = self.session._run_call(self, args)
        note_reached(self, args, outputs)  # Note [bypass detector]
        return outputs

    # ---- stage execution -------------------------------------------------------------
    def _stage(self, stage: StageGraph, env: list[Any], sig: int, args: list[Any] | None = None) -> tuple[tuple[Any, ...], int]:
        """Run ``stage`` on ``args`` (default: its input slots), fill its output slots."""
        if args is None:
            args = [env[i] for i in stage.inputs]
        key = (stage.name, sig)
        hit = self._resolved.get(key)
        if hit is None:
            hit = (self.engine.get(stage, args), self.stage_flops(stage, args))
            self._resolved[key] = hit
        fn, flops = hit
        outs = fn(*args)
        for slot, value in zip(stage.outputs, outs):
            env[slot] = value
        return outs, flops

    def run_graph(self, args: Sequence[Any], sig: int, request: GraphRequest) -> tuple[Any, int, Any, Any]:
        """Run the graph as ``request`` says (its action FULL, BLOCK or ATTN; with a probe, the
        action is decided at the probe point). Returns outputs (None if the probe decided
        STEP), FLOPs run, and the residuals / attention outputs recorded on the way."""
        path = self.fused_path()
        if request.resume is not None:  # the probe ran ahead on this path (it said it could)
            result = path.run(self, args, sig, request)
        elif path is not None and path.accepts(request):
            result = path.run(self, args, sig, request)
        else:
            result = self._run_units(args, sig, request)
        if request.action.kind is ActionKind.FULL and request.probe is None:
            self._full_flops.setdefault(sig, result[1])  # a full run is its own denominator
        return result

    def _run_units(self, args: Sequence[Any], sig: int, request: GraphRequest) -> tuple[Any, int, Any, Any]:
        env: list[Any] = [None] * self.plan.num_slots
        env[: len(args)] = args
        spec = describe(request.action, request.branch)
        record, probe, cached_attn = request.record, request.probe, request.attention
        if probe is not None and probe.kind == "prologue":
            decided, flops = self._run_probe(probe, env, sig)
            probe, spec = None, describe(decided, request.branch)
            if spec.runs is Runs.NOTHING:
                return None, flops, {}, {}
        else:
            flops = self._stage(self.plan.prologue, env, sig)[1]
        range_inputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        new_res: dict[tuple[int, int], list[torch.Tensor]] = {}
        new_attn: dict[int, list[torch.Tensor]] = {}
        i, units = 1, self.units
        while i < len(units):
            unit = units[i]
            if unit.kind != "block":
                flops += self._stage(unit.stage, env, sig)[1]
                i += 1
                continue
            g = unit.block
            block = self.blocks[g]
            skip = spec.skips
            if skip is not None and g == skip[0]:
                last = self.blocks[skip[1] - 1]
                for (j, dst), res in zip(last.stream_map, request.residuals(skip)):
                    check_same_layout(env[block.stream_in[j]], res, f"residual of blocks {skip[0]}-{skip[1]}")
                    env[dst] = env[block.stream_in[j]] + res
                i = self.block_unit[skip[1] - 1] + 1
                continue
            for rng in record.ranges:
                # A declared range that is not reusable (it crosses chains) has no residual.
                if rng[0] == g and rng in self.model_info.reusable_ranges:
                    range_inputs[rng] = [env[s] for s in block.stream_in]
            if g in spec.reuses_attention:
                for j, slot in enumerate(block.attn_out):
                    env[slot] = cached_attn[g][j]
                variant = block.attn_reused
                flops += self._stage(variant, env, sig, [env[s] for s in variant.inputs] + list(cached_attn[g]))[1]
            else:
                if probe is not None and g == probe.blocks - 1:
                    decided, f = self._run_probe(probe, env, sig)
                    probe, spec = None, describe(decided, request.branch)
                    if spec.runs is Runs.NOTHING:
                        return None, flops + f, new_res, new_attn
                else:
                    f = self._stage(block.stage, env, sig)[1]
                flops += f
                if g in record.attn:
                    new_attn[g] = [env[s] for s in block.attn_out]
            for rng in record.ranges:
                if rng[1] - 1 == g and rng in range_inputs:
                    for j, dst in block.stream_map:
                        check_same_layout(env[dst], range_inputs[rng][j], f"input of blocks {rng[0]}-{rng[1]}")
                    new_res[rng] = [env[dst] - range_inputs[rng][j] for j, dst in block.stream_map]
            i += 1
        outputs = [env[s] if is_slot else s for s, is_slot in zip(self.plan.output_spec, self.plan.output_is_slot)]
        return outputs, flops, new_res, new_attn

    def _run_probe(self, probe: ProbeRun, env: list[Any], sig: int) -> tuple[Action, int]:
        """Run the probe's stage (the prologue, or block ``probe.blocks - 1``) as its indicator
        variant, fill its outputs, and return the action ``probe.decide`` picks plus the FLOPs
        run. Without a previous value the plain stage runs and the indicator is +inf."""
        plan = self.plan
        h_in = env[plan.hidden_in] if probe.kind == "blocks" else None
        if h_in is not None and probe.previous is not None:
            check_same_layout(h_in, probe.previous, "previous probe residual")  # Note [shard-local caches]
        if probe.previous is None:
            stage = plan.prologue if probe.kind == "prologue" else self.blocks[probe.blocks - 1].stage
            _, flops = self._stage(stage, env, sig)
            value = probe_value(plan, probe.kind, probe.blocks, env)
            return probe.decide(torch.tensor([1.0, 0.0]), value), flops  # 1 / 0: +inf
        variant = plan.probe_variant(probe.kind, probe.blocks)
        args = [env[i] for i in variant.inputs] + ([h_in] if h_in is not None else []) + [probe.previous]
        key = (variant.name, sig)
        if key not in self._resolved:
            self._resolved[key] = (self.engine.get(variant, args), self.stage_flops(variant, args))
        fn, flops = self._resolved[key]
        outs = fn(*args)
        n = len(variant.outputs)
        for slot, value in zip(variant.outputs, outs[:n]):
            env[slot] = value
        value = outs[n] if probe.kind == "blocks" else env[plan.modulation_slot]
        check_same_layout(value, probe.previous, "previous probe value")
        return probe.decide(outs[-1], value), flops

    @staticmethod
    def _fake_outputs(stage: StageGraph, args: list[Any]) -> tuple[Any, ...]:
        """The stage's outputs on fake tensors (shapes only), for stand-ins built once per
        signature. Note [accounting never breaks a call]: a stage fake tensors cannot run (a
        data-dependent op) runs once on its real, detached inputs instead."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        try:
            fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in plain]
            with mode, torch.no_grad():
                return stage.gm(*fakes)
        except Exception:  # noqa: BLE001 - shapes come from a real run then
            with torch.no_grad():
                return stage.gm(*plain)


def _sources(placeholders: Sequence[Any]) -> list[str] | None:
    """Dynamo's source name of every graph input, or None if one has none (a graph not
    traced by Dynamo)."""
    names = []
    for node in placeholders:
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is None:
            return None
        name = source.name
        names.append(name() if callable(name) else name)  # a method in older torch
    return names


def probe_value(plan: StagePlan, kind: str, blocks: int, env: Sequence[Any]) -> torch.Tensor:
    """The value a probe watches, from filled slots: the modulation input (prologue probe),
    or the residual of the first ``blocks`` blocks' hidden stream (blocks probe; the in-graph
    variant, ``passes/indicator.py``, computes the same difference)."""
    value = env[plan.probe_slot(kind, blocks)]
    if kind == "prologue":
        return value
    h_in = env[plan.hidden_in]
    check_same_layout(value, h_in, "probe residual (first blocks' input)")
    return value - h_in


__all__ = ["StageRunner", "ProbeRun", "GraphRequest", "RecordSet", "probe_value"]
