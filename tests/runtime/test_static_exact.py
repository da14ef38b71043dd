"""Every action under the static policy equals the independent eager reference of that action."""

from __future__ import annotations

import pytest
import torch

from mixcache_compile import CacheSession
from tests.eager_reference import EagerReference, two_stream_adapter, wan_adapter
from tests.tiny_models import cogvideox, wan

TOL = 1e-5

# Separate-CFG schedule over 8 steps touching every action (3-block model).
SEPARATE = {
    (1, "uncond"): "cfg",
    2: "step",
    3: "block:1-3",
    4: "attn:0,2",
    (6, "cond"): "block:0-2",
    (6, "uncond"): "cfg",
    7: "step",
}
WATCH_RANGES = [(1, 3), (0, 2)]
WATCH_ATTN = [0, 2]


def _action(schedule: dict, step: int, branch: str) -> str:
    return schedule.get((step, branch), schedule.get(step, "full"))


def _compile(model, session, **kw):
    return torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager", **kw}, fullgraph=True)


def test_every_action_separate_cfg_matches_reference():
    model, make = wan()
    session = CacheSession("static", schedule=SEPARATE)
    compiled = _compile(model, session, repeated_blocks=["WanTransformerBlock"])
    ref = EagerReference(model, wan_adapter(model))
    cond, uncond = make(1, seed=1), make(1, seed=2)
    expected_trace = []
    with torch.no_grad():
        for step in range(8):
            latent = make(1, seed=10 + step)["hidden_states"]
            t = torch.tensor([900.0 - 100 * step])
            for branch, inputs in (("cond", cond), ("uncond", uncond)):
                kwargs = {**inputs, "hidden_states": latent, "timestep": t}
                action = _action(SEPARATE, step, branch)
                with session.context(branch, step_index=step, num_inference_steps=8):
                    got = compiled(**kwargs)[0]
                want = ref.call(step, branch, action, kwargs, WATCH_RANGES, WATCH_ATTN)
                assert (got - want).abs().max().item() <= TOL, (step, branch, action)
                expected_trace.append((step, branch, action))
    got_trace = [(e.step, e.branch, e.action.lower().replace("(", ":").replace(")", "")) for e in session.trace]
    assert got_trace == expected_trace
    assert not session.stats()["fallbacks"]
    stats = session.stats()
    assert 0.0 < stats["computed_fraction"] < 1.0
    assert stats["actions"] == {"FULL": 5, "CFG": 2, "STEP": 4, "BLOCK": 3, "ATTN": 2}


def test_timestep_tracking_gives_same_decisions_without_context():
    """No context at all: steps from timestep changes, branches from call order."""
    model, make = wan()
    sched = {2: "step", (3, "uncond"): "cfg"}
    with_ctx, without = CacheSession("static", schedule=sched), CacheSession("static", schedule=sched)
    a = _compile(model, with_ctx)
    b = _compile(model, without)
    with torch.no_grad():
        for step in range(5):
            kwargs = {**make(1, seed=step), "timestep": torch.tensor([900.0 - 100 * step])}
            for branch in ("cond", "uncond"):
                with with_ctx.context(branch, step_index=step):
                    x = a(**kwargs)[0]
                y = b(**kwargs)[0]
                torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert [(e.step, e.branch, e.action) for e in with_ctx.trace] == [(e.step, e.branch, e.action) for e in without.trace]


BATCHED = {1: "cfg", 2: "step", 3: "block:1-3", 4: "attn:0,2", 6: "cfg", 7: "block:0-1"}


def test_every_action_batched_cfg_matches_reference():
    model, make = cogvideox()
    session = CacheSession("static", schedule=BATCHED, cfg="batched")
    compiled = _compile(model, session)
    ref = EagerReference(model, two_stream_adapter(model))
    base = make(2, seed=1)
    with torch.no_grad():
        for step in range(8):
            latent = make(1, seed=20 + step)["hidden_states"].repeat(2, 1, 1, 1, 1)
            kwargs = {**base, "hidden_states": latent, "timestep": torch.full((2,), 900 - 100 * step)}
            for name in ("hidden_states", "encoder_hidden_states", "timestep"):
                torch._dynamo.mark_dynamic(kwargs[name], 0)
            got = compiled(**kwargs)[0]
            action = BATCHED.get(step, "full")
            want = ref.call(step, "batch", action, kwargs, [(1, 3), (0, 1)], [0, 2])
            assert (got - want).abs().max().item() <= TOL, (step, action)
    assert [e.action for e in session.trace] == ["FULL", "CFG", "STEP", "BLOCK(1-3)", "ATTN(0,2)", "FULL", "CFG", "BLOCK(0-1)"]
    assert not session.stats()["fallbacks"]


def test_missing_cache_falls_back_to_full_and_says_why():
    model, make = wan()
    session = CacheSession("static", schedule={0: "step", 1: "block:0-2", (1, "uncond"): "cfg"})
    compiled = _compile(model, session)
    with torch.no_grad():
        for step in range(2):
            kwargs = {**make(1), "timestep": torch.tensor([900.0 - 100 * step])}
            for branch in ("cond", "uncond"):
                with session.context(branch, step_index=step):
                    got = compiled(**kwargs)[0]
                torch.testing.assert_close(got, model(**kwargs)[0], rtol=0, atol=1e-5) if step == 0 else None
    actions = [e.action for e in session.trace]
    assert actions[:2] == ["FULL", "FULL"]  # nothing cached yet at step 0
    assert session.trace[0].fallback == "no cached output for this branch"
    assert session.stats()["fallbacks"]
