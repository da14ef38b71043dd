"""The callable the backend returns: runs the stage graphs an action needs, call by call.

Decisions are made here, between stage calls, never inside a compiled graph. Every value of
the original graph has a slot; a stage reads its input slots and fills its output slots.
Skipping a block range fills the range's stream outputs from its stream inputs plus the
cached residual; reusing attention feeds the cached attention output to the block variant
that takes it as an input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..engines.base import Engine
from ..passes.plan import BlockStage, StagePlan, range_ok
from ..passes.stage_graph import StageGraph
from ..policies.protocol import Action, ActionKind, ModelInfo
from .flops import count_flops
from .inputs import InputInfo


class StageRunner:
    """Runs one planned graph under a session. Holds no cache state itself (the session does)."""

    def __init__(self, plan: StagePlan, engine: Engine, inputs: InputInfo, session: Any) -> None:
        self.plan = plan
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

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        return self.session._run_call(self, args)

    # ---- stage execution -------------------------------------------------------------
    def _stage(self, stage: StageGraph, env: list[Any], sig: tuple) -> tuple[tuple[Any, ...], int]:
        args = [env[i] for i in stage.inputs]
        key = (stage.name, sig)
        hit = self._resolved.get(key)
        if hit is None:
            hit = (self.engine.get(stage, args), count_flops(stage, args))
            self._resolved[key] = hit
        fn, flops = hit
        outs = fn(*args)
        for slot, value in zip(stage.outputs, outs):
            env[slot] = value
        return outs, flops

    def run_graph(
        self,
        args: Sequence[Any],
        sig: tuple,
        action: Action,
        residuals: dict[tuple[int, int], list[torch.Tensor]],
        cached_attn: dict[int, list[torch.Tensor]],
        record_ranges: set[tuple[int, int]],
        record_attn: set[int],
    ) -> tuple[list[Any], int, dict, dict]:
        """Run the graph with ``action`` (FULL, BLOCK or ATTN). Returns outputs, FLOPs run,
        the residuals of ``record_ranges`` and the attention outputs of ``record_attn``
        computed on the way (only for ranges/blocks actually computed)."""
        env: list[Any] = [None] * self.plan.num_slots
        env[: len(args)] = args
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
                    for (j, dst), res in zip(last.stream_map, residuals[skip]):
                        env[dst] = env[block.stream_in[j]] + res
                    g = skip[1]
                    continue
                for rng in record_ranges:
                    if rng[0] == g:
                        range_inputs[rng] = [env[s] for s in block.stream_in]
                if g in reuse_attn:
                    variant = block.attn_reused
                    for j, slot in enumerate(block.attn_out):
                        env[slot] = cached_attn[g][j]
                    args_v = [env[i] for i in variant.inputs] + list(cached_attn[g])
                    flops += self._run_variant(variant, args_v, env, sig)
                else:
                    outs, f = self._stage(block.stage, env, sig)
                    flops += f
                    if g in record_attn:
                        new_attn[g] = [env[s] for s in block.attn_out]
                for rng in record_ranges:
                    if rng[1] - 1 == g and rng in range_inputs:
                        new_res[rng] = [env[dst] - range_inputs[rng][j] for j, dst in block.stream_map]
                g += 1
        flops += self._stage(self.plan.epilogue, env, sig)[1]
        outputs = [env[s] if is_slot else s for s, is_slot in zip(self.plan.output_spec, self.plan.output_is_slot)]
        return outputs, flops, new_res, new_attn

    def _run_variant(self, variant: StageGraph, args: list[Any], env: list[Any], sig: tuple) -> int:
        key = (variant.name, sig)
        hit = self._resolved.get(key)
        if hit is None:
            hit = (self.engine.get(variant, args), count_flops(variant, args))
            self._resolved[key] = hit
        fn, flops = hit
        for slot, value in zip(variant.outputs, fn(*args)):
            env[slot] = value
        return flops

    def full_flops(self, args: Sequence[Any], sig: tuple) -> int:
        """FLOPs of computing this call in full (the denominator of ``computed_fraction``)."""
        if sig not in self._full_flops:
            env: list[Any] = [None] * self.plan.num_slots
            env[: len(args)] = args
            total = 0
            for stage in self._all_stages():
                stage_args = [env[i] for i in stage.inputs]
                key = (stage.name, sig)
                total += self._resolved[key][1] if key in self._resolved else count_flops(stage, stage_args)
                for slot, value in zip(stage.outputs, self._fake_outputs(stage, stage_args)):
                    env[slot] = value
            self._full_flops[sig] = total
        return self._full_flops[sig]

    def _all_stages(self) -> list[StageGraph]:
        stages = [self.plan.prologue]
        g = 0
        for c, chain in enumerate(self.plan.chains):
            if c in self.plan.glue:
                stages.append(self.plan.glue[c])
            stages.extend(b.stage for b in chain)
        stages.append(self.plan.epilogue)
        return stages

    @staticmethod
    def _fake_outputs(stage: StageGraph, args: list[Any]) -> tuple[Any, ...]:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fakes = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with mode, torch.no_grad():
            return stage.gm(*fakes)
