"""Note [accounting never breaks a call]: data-dependent stages are counted on real tensors
once, uncountable stages are named in ``stats()``, and no call ever fails for accounting."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import mixcache_compile.runtime.executor as executor_module
from mixcache_compile import CacheSession
from mixcache_compile.passes.stage_graph import StageGraph
from mixcache_compile.runtime.flops import FAKE, REAL, UNKNOWN, StageFlops, count_flops, measure_flops


class MaskedBlock(nn.Module):
    """A block that updates only the tokens a boolean mask selects (``nonzero`` + index ops):
    the shape of its matmul depends on the mask's data."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.lin = nn.Linear(dim, dim)
        self.mod = nn.Linear(dim, dim)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        idx = mask.nonzero().squeeze(-1)
        update = self.lin(self.norm(h).index_select(1, idx)) * self.mod(temb)[:, None]
        return h.index_add(1, idx, update)


class MaskedDiT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.proj_in = nn.Linear(4, dim)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList([MaskedBlock(dim) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, 4)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor]:
        h, temb = self.proj_in(hidden_states), self.time(timestep[:, None] / 1000.0)
        for block in self.blocks:
            h = block(h, temb, mask)
        return (self.proj_out(h),)


def _inputs(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(1, 10, 4, generator=g), torch.tensor([900.0 - 100 * step]), torch.arange(10) % 3 != 1


def _eager_flops(model: nn.Module, args) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args)
    return counter.get_total_flops()


def _run(session: CacheSession, steps: int, mode=torch.inference_mode, fuse: bool = True):
    """``fuse=False`` keeps one stage per block, so the tests can name the stages counted."""
    torch.manual_seed(0)
    model = MaskedDiT().eval()
    options = {"session": session, "engine": "eager", "fuse_stages": fuse}
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, backend="mixcache", options=options, fullgraph=True)
        outs = []
        for step in range(steps):
            with mode(), session.context("cond", step_index=step):
                outs.append(compiled(*_inputs(step))[0])
    return model, outs


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_data_dependent_blocks_plan_equal_eager_and_count_on_real_tensors(mode):
    session = CacheSession("none")
    model, outs = _run(session, steps=2, mode=mode, fuse=False)
    with torch.no_grad():
        for step, out in enumerate(outs):
            torch.testing.assert_close(out, model(*_inputs(step))[0], rtol=0, atol=1e-6)
    assert session._runner is not None and session._runner.model_info.num_blocks == 3, "not planned"
    stats = session.stats()
    assert stats["flops_from_real_tensors"] == ["block.0.0", "block.0.1", "block.0.2"]
    assert not stats["flops_unknown"]
    assert stats["flops_full"] == 2 * _eager_flops(model, _inputs(0))  # an independent count


def test_data_dependent_blocks_cache_and_count_the_skipped_work():
    session = CacheSession("static", schedule={1: "step", 2: "block:0-2"})
    model, outs = _run(session, steps=3)
    per_call = _eager_flops(model, _inputs(0))
    stats = session.stats()
    assert stats["actions"] == {"FULL": 1, "STEP": 1, "BLOCK": 1} and not stats["fallbacks"]
    assert stats["flops_full"] == 3 * per_call
    assert stats["flops_run"] < 2 * per_call  # the step call ran nothing, the block call skipped 2 of 3 blocks
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_a_probe_call_first_counts_the_full_call_by_a_real_walk():
    """fbcache probes the first block on its first call, so the full-call FLOPs of that
    signature come from walking every stage: on real tensors, as the blocks are data-dependent."""
    session = CacheSession("fbcache", threshold=0.05)
    model, outs = _run(session, steps=3)
    with torch.no_grad():
        torch.testing.assert_close(outs[0], model(*_inputs(0))[0], rtol=0, atol=1e-6)
    stats = session.stats()
    assert stats["flops_full"] == 3 * _eager_flops(model, _inputs(0))
    assert not stats["flops_unknown"]


def test_an_uncountable_stage_is_named_in_stats_and_the_call_still_runs(monkeypatch):
    real_measure = executor_module.measure_flops

    def blocks_unknown(stage, args, mode=None):
        if stage.name.startswith("block."):
            return StageFlops(None, UNKNOWN, "test: no flop formula")
        return real_measure(stage, args, mode)

    monkeypatch.setattr(executor_module, "measure_flops", blocks_unknown)
    session = CacheSession("none")
    model, outs = _run(session, steps=1, fuse=False)
    with torch.no_grad():
        torch.testing.assert_close(outs[0], model(*_inputs(0))[0], rtol=0, atol=1e-6)
    assert session.stats()["flops_unknown"] == {f"block.0.{i}": "test: no flop formula" for i in range(3)}


def _nonzero_stage() -> StageGraph:
    graph = fx.Graph()
    x = graph.placeholder("x")
    idx = graph.call_function(torch.nonzero, (x,))
    graph.output((graph.call_function(torch.mul, (idx, 2)),))
    return StageGraph("nz", fx.GraphModule(torch.nn.Module(), graph), [0], [1])


def test_measure_flops_falls_back_to_real_tensors_then_unknown():
    stage = _nonzero_stage()
    real = measure_flops(stage, [torch.tensor([0.0, 1.0, 2.0])])
    assert real.method == REAL and real.flops == 0 and "DynamicOutputShapeException" in real.note
    assert real.outputs[0].tolist() == [[2], [4]]
    fake_input = FakeTensorMode().from_tensor(torch.tensor([0.0, 1.0]))
    unknown = measure_flops(stage, [fake_input])
    assert unknown.method == UNKNOWN and unknown.flops is None and "no real inputs" in unknown.note
    with pytest.raises(RuntimeError, match="FLOPs of stage 'nz' cannot be counted"):
        count_flops(stage, [fake_input])


def test_measure_flops_counts_a_matmul_under_inference_mode_on_params_that_require_grad():
    graph = fx.Graph()
    a, w = graph.placeholder("a"), graph.placeholder("w")
    graph.output((graph.call_function(torch.matmul, (a, w)),))
    stage = StageGraph("mm", fx.GraphModule(torch.nn.Module(), graph), [0, 1], [2])
    weight = nn.Parameter(torch.randn(8, 5))
    with torch.inference_mode():
        result = measure_flops(stage, [torch.randn(3, 8), weight])
    assert result.method == FAKE and result.flops == 2 * 3 * 8 * 5
