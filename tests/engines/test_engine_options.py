"""torch.compile's ``mode`` and inductor ``options`` reach every stage compile; the fused plan
compiles one graph for policy ``none`` and does not recompile across generations."""

from __future__ import annotations

import pytest
import torch

from mixcache_compile import CacheSession
from mixcache_compile.engines import make_engine
from tests.passes.test_planner_units import Net, _inputs


def _compile_capturing(monkeypatch, **compile_kwargs):
    """Compile Net with engine inductor, recording the config patches of each stage compile
    (the compile itself is replaced by the eager graph: this checks plumbing, not inductor)."""
    import torch._inductor.compile_fx as cfx

    seen: list = []

    def fake_compile_fx(gm, inputs, config_patches=None, **_):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    torch.manual_seed(0)
    model = Net(depth=4).eval()
    compiled = torch.compile(model, backend="mixcache", fullgraph=True, **compile_kwargs)
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=0, atol=1e-6)
    return seen


def test_mode_of_torch_compile_reaches_stage_compiles(monkeypatch):
    seen = _compile_capturing(monkeypatch, mode="max-autotune-no-cudagraphs")
    assert seen and all(p == {"max_autotune": True, "coordinate_descent_tuning": True} for p in seen)


def test_mode_and_inductor_options_in_backend_options(monkeypatch):
    session = CacheSession("static", schedule={1: "block:1-3"})
    options = {"session": session, "engine": "inductor", "mode": "max-autotune-no-cudagraphs", "inductor": {"max_autotune": False, "epilogue_fusion": False}}
    seen = _compile_capturing(monkeypatch, options=options)
    assert seen == [{"max_autotune": False, "coordinate_descent_tuning": True, "epilogue_fusion": False}] * len(seen)
    # Static block:1-3 keeps only the cuts its range needs: [prologue, block 0] [blocks 1-2] [block 3, epilogue].
    assert session.stats()["stages"] == 3


def test_no_options_compile_with_inductor_defaults(monkeypatch):
    seen = _compile_capturing(monkeypatch, options={"session": CacheSession("none"), "engine": "inductor"})
    assert seen == [None]  # one fused graph, no patches


def test_bad_engine_options_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown inductor option"):
        make_engine("inductor", None, {"no_such_option": 1})
    with pytest.raises(RuntimeError, match="Unrecognized mode"):
        make_engine("inductor", "fastest", None)
    with pytest.raises(ValueError, match="apply to engine='inductor'"):
        make_engine("eager", "max-autotune", None)
    model = Net(depth=4).eval()
    compiled = torch.compile(model, backend="mixcache", fullgraph=True, options={"engine": "eager", "fuse_stages": "yes"})
    with pytest.raises(Exception, match="fuse_stages"):
        compiled(*_inputs())


def test_fuse_stages_false_runs_the_unfused_plan():
    torch.manual_seed(0)
    model = Net(depth=4).eval()
    session = CacheSession("none")
    compiled = torch.compile(model, backend="mixcache", fullgraph=True, options={"session": session, "engine": "eager", "fuse_stages": False})
    with torch.no_grad():
        compiled(*_inputs())
    assert session.stats()["stages"] == 6


@pytest.mark.inductor
def test_policy_none_is_one_compiled_graph_without_recompiles():
    torch.manual_seed(0)
    model = Net(depth=4).eval()
    session = CacheSession("none")
    compiled = torch.compile(model, backend="mixcache", fullgraph=True, options={"session": session, "engine": "inductor"})
    with torch.no_grad():
        for generation in range(2):
            for step in range(3):
                x, _ = _inputs(step)
                t = torch.full((2,), 0.9 - 0.1 * step)  # a new timestep each step, same shapes
                with session.context("cond", step_index=step, num_inference_steps=3):
                    torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-4, atol=1e-5)
            frames = sum(torch._dynamo.utils.counters["frames"].values())
            if generation == 0:
                first = frames
    assert frames == first  # the second generation compiled no new frame
    assert session._runner.engine.compiles == 1 and session.stats()["stages"] == 1
