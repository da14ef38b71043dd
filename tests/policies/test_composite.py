"""Composite actions (Note [action table] in policies/protocol.py): one batched CFG call
rebuilds the uncond half and runs its cond half with a block range or attention reused, on
the cond half's own caches; equal to the independent eager reference call by call."""

from __future__ import annotations

import pytest
import torch

from mixcache_compile import CacheSession
from mixcache_compile.policies.protocol import CFG, Action, ActionKind, CacheNeeds
from tests.eager_reference import two_stream_adapter
from tests.policies.harness import compile_model, drive_batched
from tests.policies.reference import Reference
from tests.tiny_models import cogvideox

STEPS = 9
# step -> action; full steps in between feed the batch caches and the cond half's
SCHEDULE = {2: "cfg", 3: "cfg+attn:0,1,2", 4: "full", 5: "cfg+block:1-2", 6: "cfg+attn:1", 7: "cfg+block:1-2"}


class ScheduleRule:
    def action(self, step, branch, computed):
        return SCHEDULE.get(step, "full")


def test_parse_and_spell_composites():
    a = Action.parse("cfg+block:1-3")
    assert a.kind is ActionKind.CFG and a.block_range == (1, 3) and a.composite
    assert a.part == Action(ActionKind.BLOCK, block_range=(1, 3)) and str(a) == "CFG+BLOCK(1-3)"
    b = Action.parse("cfg+attn:2,0")
    assert b.part.attn_blocks == (0, 2) and str(b) == "CFG+ATTN(0,2)" and Action.parse(str(b).lower().replace("(", ":").replace(")", "")) == b
    assert not CFG.composite and CFG.part.kind is ActionKind.FULL
    for bad in ("block:1-2+cfg", "cfg+step", "cfg+cfg", "attn+block:1-2"):
        with pytest.raises(ValueError):
            Action.parse(bad)
    with pytest.raises(ValueError, match="not both"):
        Action(ActionKind.CFG, block_range=(1, 2), attn_blocks=(0,))
    with pytest.raises(ValueError, match="BLOCK or CFG"):
        Action(ActionKind.STEP, block_range=(1, 2))


def test_batched_composites_match_reference():
    model, make = cogvideox()
    session = CacheSession("static", schedule=SCHEDULE, cfg="batched")
    ref = Reference(model, two_stream_adapter(model), watch_ranges=[(1, 2)], watch_attn=range(3), cond_half=True)
    log = drive_batched(model, make, session, ref, ScheduleRule(), STEPS)
    assert [a for _, _, a in log] == [SCHEDULE.get(i, "full") for i in range(STEPS)]
    assert not session.stats()["fallbacks"]
    assert session.stats()["actions"]["CFG"] == 5


def test_composite_without_cond_half_cache_falls_back_and_says_why():
    """A policy that asks for a composite but declares no ``cond_half`` gets FULL and the reason."""
    model, make = cogvideox()
    session = CacheSession("static", schedule={1: "cfg+block:1-2", 2: "cfg"}, cfg="batched")
    session.policy.needs = lambda info: CacheNeeds(cfg_delta=True, ranges={(1, 2)})
    compiled = compile_model(model, session)
    base = make(2, seed=1)
    with torch.no_grad():
        for step in range(3):
            kwargs = {**base, "hidden_states": make(1, seed=5 + step)["hidden_states"].repeat(2, 1, 1, 1, 1),
                      "timestep": torch.full((2,), 900 - 100 * step)}
            for name in ("hidden_states", "encoder_hidden_states", "timestep"):
                torch._dynamo.mark_dynamic(kwargs[name], 0)
            with session.context(step_index=step, num_inference_steps=3):
                got = compiled(**kwargs)[0]
            if step == 1:  # fell back: the output is the uncached model's
                torch.testing.assert_close(got, model(**kwargs)[0], rtol=0, atol=1e-5)
    assert [e.action for e in session.trace] == ["FULL", "FULL", "CFG"]
    assert session.trace[1].fallback == "cond half: no cached residual for blocks 1-2"
