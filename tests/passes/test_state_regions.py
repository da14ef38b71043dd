"""A ``torch.func.vmap`` inside each repeated block (flex attention's mask creation does this,
e.g. Kandinsky6SRTransformer3DModel) is traced as ``_vmap_increment_nesting`` ...
``_vmap_decrement_nesting``; the closing call has no inputs and no module stack, so the
partitioner used to hoist it to the prologue, and the block stage failed with
``!dynamicLayerStack.empty()`` (Note [state regions] in passes/state_regions.py)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from mixcache_compile import CacheSession
from mixcache_compile.passes.partition import PROLOGUE, Segment
from mixcache_compile.passes.state_regions import StateRegionError, keep_regions_whole, state_regions
from mixcache_compile.runtime.entry import install_entry


class _VmapBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A per-row mask made with vmap, as flex attention's create_mask does.
        mask = torch.func.vmap(lambda row: (row > 0).float())(x)
        return x + self.proj(x) * mask


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList([_VmapBlock() for _ in range(3)])
        self.out = torch.nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = self.embed(hidden_states) * timestep
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def test_vmap_inside_blocks_plans_and_equals_eager():
    torch.manual_seed(0)
    model = _Model().eval()
    session = CacheSession("none")
    install_entry(model, session)
    compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"})
    for step in range(2):
        x, t = torch.randn(2, 4, 8), torch.tensor([0.9 - 0.1 * step])
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x, t), model(x, t), rtol=0, atol=0)
    assert session._runner is not None, "the model should plan"
    assert len(session._runner.plan.chains[0]) == 3
    for block in session._runner.plan.blocks():
        code = block.stage.gm.code
        assert code.count("_vmap_increment_nesting") == code.count("_vmap_decrement_nesting") > 0


def _graph_with_region() -> tuple[fx.GraphModule, list[fx.Node]]:
    from torch._functorch import predispatch

    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(torch.neg, (x,))
    inc = graph.call_function(predispatch._vmap_increment_nesting, (1, "error"))
    b = graph.call_function(torch.sin, (a,))
    dec = graph.call_function(predispatch._vmap_decrement_nesting, ())
    c = graph.call_function(torch.cos, (b,))
    graph.output(c)
    return fx.GraphModule(torch.nn.Module(), graph), [a, inc, b, dec, c]


def test_region_is_moved_into_the_block_it_touches():
    gm, (a, inc, b, dec, c) = _graph_with_region()
    assert state_regions([a, inc, b, dec, c]) == [(1, 3, "torch.func.vmap")]
    block = Segment("block", 0, 0)
    segments = {a: PROLOGUE, inc: block, b: block, dec: PROLOGUE, c: Segment("block", 0, 1)}
    assert keep_regions_whole(gm, segments) == 1
    assert segments[dec] == block and segments[a] == PROLOGUE


def test_region_over_two_blocks_is_refused_with_a_reason():
    gm, (a, inc, b, dec, c) = _graph_with_region()
    segments = {a: PROLOGUE, inc: Segment("block", 0, 0), b: Segment("block", 0, 1), dec: Segment("block", 0, 1),
                c: Segment("block", 0, 1)}
    with pytest.raises(StateRegionError, match="torch.func.vmap region .* spans stages block.0.0, block.0.1"):
        keep_regions_whole(gm, segments)
