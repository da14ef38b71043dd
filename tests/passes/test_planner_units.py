"""The planning passes on small hand-written modules: what they find, cut and refuse."""

from __future__ import annotations

import warnings

import pytest
import torch

from mixcache_compile import CacheSession
from mixcache_compile.passes.module_stack import normalise_path


class Block(torch.nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.attn = Attention(dim)
        self.ff = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ff(x) * t


class Attention(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class Net(torch.nn.Module):
    def __init__(self, depth: int = 4, graph_break_after: int | None = None, inplace: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(depth))
        self.out = torch.nn.Linear(8, 8)
        self.graph_break_after = graph_break_after
        self.inplace = inplace

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(timestep)[:, None, None]
        h = self.embed(x)
        if self.graph_break_after is not None:  # unrolled, so Dynamo cuts the frame in two
            for block in self.blocks[: self.graph_break_after + 1]:
                h = block(h, t)
            torch._dynamo.graph_break()
            for block in self.blocks[self.graph_break_after + 1:]:
                h = block(h, t)
        else:
            for block in self.blocks:
                h = block(h, t)
        if self.inplace:
            h.mul_(2.0)
        return self.out(h)


def _compile(model, session, **options):
    return torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager", **options}, fullgraph=False)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 8, generator=g), torch.tensor([0.3, 0.3])


def test_normalise_path():
    assert normalise_path("L['self'].__dict__['_modules']['blocks'].1.attn1.to_q") == "blocks.1.attn1.to_q"
    assert normalise_path("L['self'].blocks.0") == "blocks.0"
    assert normalise_path("L['self'].__dict__['_modules']['blocks']['12']") == "blocks.12"


def test_plan_of_a_plain_module():
    torch.manual_seed(0)
    model = Net().eval()
    session = CacheSession("none")
    compiled = _compile(model, session)
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=0, atol=1e-6)
    runner = session._runner
    plan = runner.plan
    assert plan.chain_names == ["blocks"] and len(plan.chains[0]) == 4
    assert len({b.stage.key for b in runner.blocks}) == 1  # one graph for all four blocks
    # The attention-reused variant computes no attention: fewer FLOPs than the full block.
    block = runner.blocks[1]
    assert block.attn_reused is not None and len(block.attn_out) == 1
    assert "scaled_dot_product_attention" in block.stage.gm.code
    assert "scaled_dot_product_attention" not in block.attn_reused.gm.code
    assert runner.model_info.reusable_ranges == frozenset((a, b) for a in range(4) for b in range(a + 1, 5))


def test_block_reuse_on_plain_module_equals_manual_residual():
    torch.manual_seed(0)
    model = Net().eval()
    session = CacheSession("static", schedule={1: "block:1-3"})
    compiled = _compile(model, session)
    x0, t0 = _inputs(0)
    x1, t1 = _inputs(1)
    t1 = t1 * 0.5
    with torch.no_grad():
        compiled(x0, t0)
        got = compiled(x1, t1)
        # By hand: residual of blocks 1..2 at step 0, added to their input at step 1.
        def run(x, t, residual=None):
            tt = torch.sigmoid(t)[:, None, None]
            h = model.blocks[0](model.embed(x), tt)
            h_in = h
            if residual is None:
                h = model.blocks[2](model.blocks[1](h, tt), tt)
            else:
                h = h + residual
            res = h - h_in
            return model.out(model.blocks[3](h, tt)), res

        _, res0 = run(x0, t0)
        want, _ = run(x1, t1, res0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert [e.action for e in session.trace] == ["FULL", "BLOCK(1-3)"]


def test_no_repeated_blocks_warns_and_stays_correct():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    session = CacheSession("none")
    compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"})
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="not caching this graph"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x))
    assert session._runner is None


def test_repeated_blocks_filter_names_the_missing_class():
    model = Net().eval()
    session = CacheSession("none")
    compiled = _compile(model, session, repeated_blocks=["NoSuchBlock"])
    x, t = _inputs()
    with pytest.warns(UserWarning, match="NoSuchBlock"):
        out = compiled(x, t)
    torch.testing.assert_close(out, model(x, t))


def test_graph_break_falls_back_with_a_warning():
    torch.manual_seed(0)
    model = Net(depth=6, graph_break_after=2).eval()
    session = CacheSession("static", schedule={1: "step"})
    compiled = _compile(model, session)
    x, t = _inputs()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = compiled(x, t)
    messages = [str(w.message) for w in caught]
    assert any("graph break" in m for m in messages), messages
    # The warning quotes Dynamo's reason and says what to do about it.
    assert any("torch._dynamo.graph_break()" in m and "remove the break" in m for m in messages), messages
    torch.testing.assert_close(out, model(x, t), rtol=0, atol=1e-6)
    assert session._runner is None  # neither half was planned: no silent reuse across a break


def test_in_place_write_to_a_stage_input_is_refused():
    torch.manual_seed(0)
    model = Net(inplace=True).eval()
    session = CacheSession("none")
    compiled = _compile(model, session)
    x, t = _inputs()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = compiled(x, t)
    torch.testing.assert_close(out, model(x, t), rtol=0, atol=1e-6)
    assert any("in place" in str(w.message) for w in caught)
    assert session._runner is None


@pytest.mark.parametrize(
    "options, match",
    [
        ({"engine": "tvm"}, "unknown engine 'tvm'; valid engines: eager, inductor"),
        ({"bogus": 1}, r"unknown mixcache option\(s\) \['bogus'\]"),
        ({"session": "none"}, "must be a CacheSession"),
        ({"repeated_blocks": "Block"}, "list of block class names"),
    ],
)
def test_bad_backend_options_are_named(options, match):
    model = Net().eval()
    compiled = torch.compile(model, backend="mixcache", options=options)
    with pytest.raises(Exception, match=match):
        compiled(*_inputs())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "fastest"}, "unknown policy 'fastest'; valid policies: .*none.*static"),
        ({"policy": "static", "schedul": {}}, r"unknown option\(s\) \['schedul'\] for policy 'static'"),
        ({"policy": "static", "schedule": {0: "warp"}}, "unknown action 'warp'"),
        ({"policy": "static", "schedule": {0: "block:3-1"}}, "START < STOP"),
        ({"policy": "static", "every": 0}, "every must be a positive int"),
        ({"cfg": "both"}, "unknown cfg mode 'both'"),
    ],
)
def test_bad_session_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CacheSession(**kwargs)
