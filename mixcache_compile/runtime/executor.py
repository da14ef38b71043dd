"""The callable the backend returns: runs the stage graphs an action needs, call by call.

Decisions are made here, between stage calls, never inside a compiled graph. Every value of
the original graph has a slot; a stage reads its input slots and fills its output slots.
Skipping a block range fills the range's stream outputs from its stream inputs plus the
cached residual; reusing attention feeds the cached attention output to the block variant
that takes it as an input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..engines.base import Engine
from ..passes.fuse import ProbePoint, fuse_plan
from ..passes.indicator import with_residual_indicator, with_value_indicator
from ..passes.plan import BlockStage, StagePlan, range_ok
from ..passes.stage_graph import StageGraph
from ..policies.protocol import Action, ActionKind, ModelInfo
from .distributed import check_same_layout
from .flops import FAKE, StageFlops, graph_flops, measure_flops
from .fused_runner import FusedPath
from .entry import note_reached
from .inputs import InputInfo

log = logging.getLogger(__name__)
_UNBOUND = object()


@dataclass
class ProbeRun:
    """A probe for one call: where, the stored previous value, and who decides after it.
    ``decide(indicator, value)`` gets the in-graph indicator (a 0-dim tensor) and the new
    value it was computed from, and returns the action to continue with."""

    kind: str
    blocks: int
    previous: torch.Tensor | None
    decide: Callable[[torch.Tensor, torch.Tensor], Action]


class StageRunner:
    """Runs one planned graph under a session. Holds no cache state itself (the session does)."""

    fuse: bool = True  # False: always run the unfused stages (the reference path)

    def __init__(self, plan: StagePlan, engine: Engine, inputs: InputInfo, session: Any, model_key: int = 0) -> None:
        self.plan = plan
        self.model_key = model_key  # identity of the model's parameters: one session, one model
        self.engine = engine
        self.inputs = inputs
        self.session = session
        self.blocks: list[BlockStage] = plan.blocks()
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
        self._full_flops: dict[tuple, int] = {}
        self._probe_variants: dict[tuple, StageGraph] = {}
        self._signature_ids: dict[tuple, int] = {}
        # Stages whose FLOPs were not counted on fake tensors, by name (read by stats()).
        self.flop_notes: dict[str, StageFlops] = {}
        self._fused: FusedPath | None = None
        self._fused_needs: Any = _UNBOUND

    # ---- stage fusion by need (passes/fuse.py) --------------------------------------------
    def fused_path(self) -> FusedPath | None:
        """The fused groups for the session's current needs, built when those change.

        Note [needs identity]: the session replaces its ``CacheNeeds`` object whenever it
        asks the policy again (``_bind``), so an identity check per call is enough to notice."""
        if not self.fuse:
            return None
        needs = getattr(self.session, "_needs", None)
        if needs is self._fused_needs:
            return self._fused
        self._fused_needs = needs
        self._fused = self._build_fused(needs)
        return self._fused

    def _build_fused(self, needs: Any) -> FusedPath | None:
        stages = [self.plan.prologue, self.plan.epilogue, *self.plan.glue.values(), *(b.stage for b in self.blocks)]
        if needs is None or any(getattr(s, "gm", None) is None for s in stages):
            return None  # stages without graphs (an exported manifest) cannot be fused
        probe = needs.probe
        point = ProbePoint(probe.kind, probe.blocks) if probe is not None else None
        if point is not None and self.probe_available(point.kind, point.blocks) is not None:
            point = None  # the session refuses this probe: no cut for it
        ranges = {r for r in needs.ranges if r in self.model_info.reusable_ranges}
        attn = {g for g in needs.attn_blocks if 0 <= g < len(self.blocks)} if self.model_info.attention_reusable else set()
        fused = fuse_plan(self.plan, ranges, attn, point)
        log.info("mixcache: %d stage(s) for policy %r (of %d unfused; cuts before units %s)",
                 fused.num_stages, getattr(self.session.policy, "name", "?"), len(fused.units), sorted(fused.cuts))
        return FusedPath(self, fused, frozenset(needs.ranges))

    def stage_count(self) -> int:
        """Stage graphs a full call runs: the fused count under the current needs."""
        path = self.fused_path()
        return path.num_stages if path is not None else 2 + len(self.plan.glue) + len(self.blocks)

    def intern(self, signature: tuple) -> int:
        """A small int for a call signature, so the per-stage lookups of the hot path hash an
        int instead of a nested tuple of shapes."""
        return self._signature_ids.setdefault(signature, len(self._signature_ids))

    def probe_available(self, kind: str, blocks: int) -> str | None:
        """Why a probe cannot run on this model, or None."""
        if kind == "prologue":
            return None if self.plan.modulation_slot is not None else "no timestep-driven prologue output to watch"
        chain0 = self.chain_bounds[0]
        if not (1 <= blocks <= chain0[1] - 1):
            return f"probe over {blocks} first blocks needs 1 <= blocks < {chain0[1]} (first chain)"
        last = self.blocks[blocks - 1]
        return None if any(j == 0 for j, _ in last.stream_map) else "the first blocks' hidden stream does not pair"

    def _probe_variant(self, kind: str, blocks: int) -> StageGraph:
        key = (kind, blocks)
        if key not in self._probe_variants:
            if kind == "prologue":
                base = self.plan.prologue
                gm = with_value_indicator(base.gm, base.outputs.index(self.plan.modulation_slot))
            else:
                base = self.blocks[blocks - 1].stage
                dst = dict(self.blocks[blocks - 1].stream_map)[0]
                gm = with_residual_indicator(base.gm, base.outputs.index(dst))
            self._probe_variants[key] = StageGraph(f"{base.name}.probe", gm, list(base.inputs), list(base.outputs))
        return self._probe_variants[key]

    def _run_probe(self, probe: ProbeRun, stage: StageGraph, env: list[Any], sig: int) -> tuple[Action, int]:
        """Run ``stage`` (the prologue, or block ``probe.blocks - 1``) as its indicator variant,
        fill its outputs, and return the action ``probe.decide`` picks plus the FLOPs run.
        Without a previous value the plain stage runs and the indicator is +inf."""
        h_in = env[self.blocks[0].stream_in[0]] if probe.kind == "blocks" else None
        if h_in is not None and probe.previous is not None:
            check_same_layout(h_in, probe.previous, "previous probe residual")  # Note [shard-local caches]
        if probe.previous is None:
            _, flops = self._stage(stage, env, sig)
            if probe.kind == "blocks":
                out = env[dict(self.blocks[probe.blocks - 1].stream_map)[0]]
                check_same_layout(out, h_in, "probe residual (first blocks' input)")
                value = out - h_in
            else:
                value = env[self.plan.modulation_slot]
            return probe.decide(torch.tensor([1.0, 0.0]), value), flops  # 1 / 0: +inf
        variant = self._probe_variant(probe.kind, probe.blocks)
        args = [env[i] for i in variant.inputs] + ([h_in] if h_in is not None else []) + [probe.previous]
        key = (variant.name, sig)
        if key not in self._resolved:
            self._resolved[key] = (self.engine.get(variant, args), self._count_flops(variant, args))
        fn, flops = self._resolved[key]
        outs = fn(*args)
        n = len(variant.outputs)
        for slot, value in zip(variant.outputs, outs[:n]):
            env[slot] = value
        value = outs[n] if probe.kind == "blocks" else env[self.plan.modulation_slot]
        check_same_layout(value, probe.previous, "previous probe value")
        return probe.decide(outs[-1], value), flops

    def _count_flops(self, stage: StageGraph, args: Sequence[Any]) -> int:
        # Overridden by mixcache_compile.export.runtime.ManifestRunner: stages loaded from an
        # export manifest have no GraphModule, their FLOPs were counted at export time.
        # Note [accounting never breaks a call]: an uncountable stage counts 0 and says why.
        result = measure_flops(stage, args)
        if result.method != FAKE:
            self.flop_notes[stage.name] = StageFlops(result.flops, result.method, result.note)
        return result.flops or 0

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        note_reached()  # Note [bypass detector]
        return self.session._run_call(self, args)

    # ---- stage execution -------------------------------------------------------------
    def _stage(self, stage: StageGraph, env: list[Any], sig: int, args: list[Any] | None = None) -> tuple[tuple[Any, ...], int]:
        """Run ``stage`` on ``args`` (default: its input slots), fill its output slots."""
        if args is None:
            args = [env[i] for i in stage.inputs]
        key = (stage.name, sig)
        hit = self._resolved.get(key)
        if hit is None:
            hit = (self.engine.get(stage, args), self._count_flops(stage, args))
            self._resolved[key] = hit
        fn, flops = hit
        outs = fn(*args)
        for slot, value in zip(stage.outputs, outs):
            env[slot] = value
        return outs, flops

    def run_graph(
        self,
        args: Sequence[Any],
        sig: int,
        action: Action,
        residuals: Callable[[tuple[int, int]], list[torch.Tensor]],
        cached_attn: dict[int, list[torch.Tensor]],
        record_ranges: set[tuple[int, int]],
        record_attn: set[int],
        probe: ProbeRun | None = None,
    ) -> tuple[list[Any] | None, int, dict, dict]:
        """Run the graph with ``action`` (FULL, BLOCK or ATTN). Returns outputs, FLOPs run,
        the residuals of ``record_ranges`` and the attention outputs of ``record_attn``
        computed on the way (only for ranges/blocks actually computed). With a ``probe``, the
        action is decided at the probe point; outputs are None if it decides STEP."""
        path = self.fused_path()
        if path is not None and path.accepts(action, probe, record_ranges, record_attn):
            return path.run(self, args, sig, action, residuals, cached_attn, record_ranges, record_attn, probe)
        env: list[Any] = [None] * self.plan.num_slots
        env[: len(args)] = args
        if probe is not None and probe.kind == "prologue":
            action, flops = self._run_probe(probe, self.plan.prologue, env, sig)
            probe = None
            if action.kind is ActionKind.STEP:
                return None, flops, {}, {}
        else:
            _, flops = self._stage(self.plan.prologue, env, sig)
        skip = action.block_range if action.kind is ActionKind.BLOCK else None
        reuse_attn = set(action.attn_blocks) if action.kind is ActionKind.ATTN else set()
        range_inputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        new_res: dict[tuple[int, int], list[torch.Tensor]] = {}
        new_attn: dict[int, list[torch.Tensor]] = {}
        g = 0
        for c, chain in enumerate(self.plan.chains):
            if c in self.plan.glue:
                flops += self._stage(self.plan.glue[c], env, sig)[1]
            end = self.chain_bounds[c][1]
            while g < end:
                block = self.blocks[g]
                if skip is not None and g == skip[0]:
                    last = self.blocks[skip[1] - 1]
                    for (j, dst), res in zip(last.stream_map, residuals(skip)):
                        check_same_layout(env[block.stream_in[j]], res, f"residual of blocks {skip[0]}-{skip[1]}")
                        env[dst] = env[block.stream_in[j]] + res
                    g = skip[1]
                    continue
                for rng in record_ranges:
                    # A declared range that is not reusable (it crosses chains) has no residual.
                    if rng[0] == g and rng in self.model_info.reusable_ranges:
                        range_inputs[rng] = [env[s] for s in block.stream_in]
                if g in reuse_attn:
                    variant = block.attn_reused
                    for j, slot in enumerate(block.attn_out):
                        env[slot] = cached_attn[g][j]
                    args_v = [env[i] for i in variant.inputs] + list(cached_attn[g])
                    flops += self._run_variant(variant, args_v, env, sig)
                elif probe is not None and g == probe.blocks - 1:
                    action, f = self._run_probe(probe, block.stage, env, sig)
                    flops += f
                    probe = None
                    if action.kind is ActionKind.STEP:
                        return None, flops, new_res, new_attn
                    skip = action.block_range if action.kind is ActionKind.BLOCK else None
                    if g in record_attn:
                        new_attn[g] = [env[s] for s in block.attn_out]
                else:
                    outs, f = self._stage(block.stage, env, sig)
                    flops += f
                    if g in record_attn:
                        new_attn[g] = [env[s] for s in block.attn_out]
                for rng in record_ranges:
                    if rng[1] - 1 == g and rng in range_inputs:
                        for j, dst in block.stream_map:
                            check_same_layout(env[dst], range_inputs[rng][j], f"input of blocks {rng[0]}-{rng[1]}")
                        new_res[rng] = [env[dst] - range_inputs[rng][j] for j, dst in block.stream_map]
                g += 1
        flops += self._stage(self.plan.epilogue, env, sig)[1]
        outputs = [env[s] if is_slot else s for s, is_slot in zip(self.plan.output_spec, self.plan.output_is_slot)]
        return outputs, flops, new_res, new_attn

    def _run_variant(self, variant: StageGraph, args: list[Any], env: list[Any], sig: int) -> int:
        return self._stage(variant, env, sig, args)[1]

    def full_flops(self, args: Sequence[Any], sig: int) -> int:
        """FLOPs of computing this call in full (the denominator of ``computed_fraction``)."""
        if sig not in self._full_flops:
            stages = self._all_stages()
            known = {s.name: self._resolved[(s.name, sig)][1] for s in stages if (s.name, sig) in self._resolved}
            total, odd = graph_flops(stages, self.plan.num_slots, args, known)
            for name, result in odd.items():
                self.flop_notes.setdefault(name, result)
            self._full_flops[sig] = total
        return self._full_flops[sig]

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

    def _all_stages(self) -> list[StageGraph]:
        stages = [self.plan.prologue]
        for c, chain in enumerate(self.plan.chains):
            if c in self.plan.glue:
                stages.append(self.plan.glue[c])
            stages.extend(b.stage for b in chain)
        stages.append(self.plan.epilogue)
        return stages
