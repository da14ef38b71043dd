"""Stage fusion by need (passes/fuse.py): which groups each policy gets, what a fused group
returns, and that the fused path decides and computes exactly as the unfused one."""

from __future__ import annotations

import pytest
import torch

from mixcache_compile import CacheSession
from mixcache_compile.passes.fuse import ProbePoint, fuse_plan, fuse_stages, stage_units
from mixcache_compile.passes.probe_split import split_prologue
from mixcache_compile.runtime.flops import measure_flops
from mixcache_compile.policies.protocol import FULL, PROBE, STEP, Action, ActionKind, CacheNeeds, Probe
from mixcache_compile.runtime.executor import StageRunner
from tests.passes.test_planner_units import Net


def _planned(depth: int = 5):
    """A plain 5-block module, compiled once so the backend plans it; returns (model, runner)."""
    torch.manual_seed(0)
    model = Net(depth=depth).eval()
    session = CacheSession("none")
    compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"}, fullgraph=True)
    with torch.no_grad():
        compiled(*_inputs(0))
    return model, session._runner


def _inputs(seed: int, t: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 8, generator=g), torch.tensor([t, t])


def _unit_names(plan, fused) -> list[list[str]]:
    return [[u.stage.name for u in fused.units[g.start:g.stop]] for g in fused.groups]


def test_groups_per_policy_shape():
    _, runner = _planned()
    plan = runner.plan
    names = [u.stage.name for u in stage_units(plan)]
    assert names == ["prologue", *(f"block.0.{k}" for k in range(5)), "epilogue"]
    # none: one graph
    assert _unit_names(plan, fuse_plan(plan)) == [names]
    # fbcache Fn=1, Bn=1: [prologue + block 0 + probe] [blocks 1-3] [block 4 + epilogue]
    fb = fuse_plan(plan, ranges={(1, 4)}, probe=ProbePoint("blocks", 1))
    assert _unit_names(plan, fb) == [names[:2], names[2:5], names[5:]]
    assert fb.groups[0].probe_stage is not None and fb.groups[1].probe_stage is None
    # teacache: [the modulation's ancestors + probe] [the rest of the prologue + the rest]
    tc = fuse_plan(plan, probe=ProbePoint("prologue"))
    assert _unit_names(plan, tc) == [["prologue.probe_head"], ["prologue.rest", *names[1:]]]
    assert tc.groups[0].probe_stage is not None
    # static with a block range and one attention block: only those cuts
    st = fuse_plan(plan, ranges={(1, 3)}, attn_blocks={4})
    assert _unit_names(plan, st) == [names[:2], names[2:4], names[4:5], names[5:6], names[6:]]
    # a single-unit group is the planned stage itself (shared compiled artifact)
    assert st.groups[2].stage is plan.blocks()[3].stage
    assert st.covers(ranges={(1, 3)}, attn_blocks={4}) and not st.covers(ranges={(0, 3)})


def test_fused_group_returns_only_values_read_outside():
    _, runner = _planned()
    plan = runner.plan
    fb = fuse_plan(plan, ranges={(1, 4)}, probe=ProbePoint("blocks", 1))
    blocks = plan.blocks()
    middle = fb.groups[1].stage
    # The range's output is its last block's hidden stream; the attention outputs every
    # block stage returns (for recording) and the streams between fused blocks stay inside.
    assert middle.outputs == [dst for _, dst in blocks[3].stream_map]
    assert not set(middle.outputs) & {s for b in blocks for s in b.attn_out}
    whole = fuse_plan(plan).groups[0].stage
    assert whole.outputs == [s for s in plan.output_spec]
    assert whole.inputs == sorted(whole.inputs)


def test_fuse_stages_equals_running_the_stages_in_order(monkeypatch):
    model, runner = _planned()
    plan = runner.plan
    seen: list = []
    original = StageRunner.run_graph
    monkeypatch.setattr(StageRunner, "run_graph", lambda self, args, *rest: (seen.append(list(args)), original(self, args, *rest))[1])
    compiled = torch.compile(model, backend="mixcache", options={"session": runner.session, "engine": "eager"}, fullgraph=True)
    with torch.no_grad():
        compiled(*_inputs(3))
        args = seen[-1]
        env = dict(enumerate(args))
        for unit in stage_units(plan):
            env.update(zip(unit.stage.outputs, unit.stage.gm(*[env[s] for s in unit.stage.inputs])))
        fused = fuse_stages("all", [u.stage for u in stage_units(plan)], list(plan.output_spec))
        got = fused.gm(*[args[s] for s in fused.inputs])
        want = model(*_inputs(3))
    assert torch.equal(got[0], env[plan.output_spec[0]])
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)


def test_fuse_stages_names_a_missing_output():
    _, runner = _planned()
    with pytest.raises(ValueError, match="not produced"):
        fuse_stages("p", [runner.plan.prologue], [10**6])


POLICIES = [
    ("none", {}),
    ("fbcache", {"threshold": 0.5, "Fn": 1, "Bn": 1}),
    ("fbcache", {"threshold": 0.5, "Fn": 2, "Bn": 0, "update": "always"}),
    ("teacache", {"threshold": 0.3, "final_full": 0}),
    ("static", {"every": 2}),
    ("static", {"schedule": {2: "block:1-3", 3: "attn:2,4", 4: "block:1-3"}, "reuse": "attn:2,4", "every": 3}),
]


def _call_args(model, runner, monkeypatch) -> list:
    """The graph arguments (user inputs and parameters) of one call, as the runner sees them."""
    seen: list = []
    original = StageRunner.run_graph
    monkeypatch.setattr(StageRunner, "run_graph", lambda self, args, *rest: (seen.append(list(args)), original(self, args, *rest))[1])
    compiled = torch.compile(model, backend="mixcache", options={"session": runner.session, "engine": "eager"}, fullgraph=True)
    with torch.no_grad():
        compiled(*_inputs(3))
    monkeypatch.undo()
    return seen[-1]


def _flops(stage, env: dict) -> int:
    return measure_flops(stage, [env[s] for s in stage.inputs]).flops


def test_prologue_probe_head_is_the_modulations_ancestors(monkeypatch):
    """Note [split prologue computes the same]: head then rest fill the prologue's slots bit
    for bit, the head holds no node the modulation does not depend on, FLOPs add up."""
    model, runner = _planned()
    plan = runner.plan
    split = split_prologue(plan.prologue, plan.modulation_slot, plan.num_slots)
    assert split is not None and plan.modulation_slot in split.head.outputs
    # Net's prologue: sigmoid(timestep) (the modulation) and embed(x); only the first is the head.
    head_ops = {n.target for n in split.head.gm.graph.nodes if n.op == "call_function"}
    assert torch.sigmoid in head_ops and torch._C._nn.linear not in head_ops
    assert any(n.target is torch._C._nn.linear for n in split.rest.gm.graph.nodes)
    args = _call_args(model, runner, monkeypatch)
    want = dict(zip(plan.prologue.outputs, plan.prologue.gm(*[args[s] for s in plan.prologue.inputs])))
    env = dict(enumerate(args))
    with torch.no_grad():
        env.update(zip(split.head.outputs, split.head.gm(*[env[s] for s in split.head.inputs])))
        env.update(zip(split.rest.outputs, split.rest.gm(*[env[s] for s in split.rest.inputs])))
    assert all(torch.equal(env[s], v) for s, v in want.items())
    assert _flops(split.head, env) + _flops(split.rest, env) == _flops(plan.prologue, env)
    assert _flops(split.head, env) < _flops(plan.prologue, env)


def _generation(model, policy, options: dict, fuse: bool) -> tuple[list, list, dict]:
    torch._dynamo.reset()
    session = CacheSession(policy, **options)
    backend_options = {"session": session, "engine": "eager", "fuse_stages": fuse}
    compiled = torch.compile(model, backend="mixcache", options=backend_options, fullgraph=True)
    outs = []
    with torch.no_grad():
        for step in range(6):
            for branch, seed in (("cond", 0), ("uncond", 1)):
                with session.context(branch, step_index=step, num_inference_steps=6):
                    outs.append(compiled(*_inputs(seed, t=0.9 - 0.05 * step)))
    return outs, [(e.action, e.indicator) for e in session.trace], session.stats()


@pytest.mark.parametrize("policy,options", POLICIES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(POLICIES)])
def test_fused_path_equals_unfused_path(policy: str, options: dict, monkeypatch):
    torch.manual_seed(0)
    model = Net(depth=5).eval()
    fused = _generation(model, policy, options, True)
    plain = _generation(model, policy, options, False)
    # Same decisions, same indicators, bit-equal outputs, same FLOP accounting.
    assert fused[1] == plain[1]
    assert all(torch.equal(a, b) for a, b in zip(fused[0], plain[0]))
    assert fused[2]["flops_full"] == plain[2]["flops_full"]
    if policy == "teacache":
        # A call the probe ends (STEP) ran only the prologue's probe head, not the whole
        # prologue (passes/probe_split.py); every other FLOP is the same.
        planned, runner = _planned()
        plan = runner.plan
        split = split_prologue(plan.prologue, plan.modulation_slot, plan.num_slots)
        env = dict(enumerate(_call_args(planned, runner, monkeypatch)))
        saved = _flops(plan.prologue, env) - _flops(split.head, env)
        steps = sum(1 for a, _ in fused[1] if a == "STEP")
        assert saved > 0 and steps > 0
        assert fused[2]["flops_run"] == plain[2]["flops_run"] - steps * saved
    else:
        assert fused[2]["flops_run"] == plain[2]["flops_run"]
    assert plain[2]["stages"] == 7
    expected = {"none": 1, "fbcache": 3, "teacache": 2, "static": 1 if "schedule" not in options else 6}
    assert fused[2]["stages"] == expected[policy]
    if policy != "none":
        assert {a for a, _ in fused[1]} != {"FULL"}, "the schedule should reuse something"


class _ProbeThenAny:
    """A prologue-probe policy that, after the probe, cycles through every action the fused
    path must then run: FULL, attention reuse, a block range, the whole step."""

    name = "probe_then_any"

    def needs(self, model):
        return CacheNeeds(outputs=True, ranges={(1, 4)}, attn_blocks={1, 3}, probe=Probe("prologue", update="always"))

    def decide(self, obs):
        return PROBE

    def after_probe(self, obs, indicator):
        if obs.step == 0:
            return FULL
        return [STEP, Action(ActionKind.ATTN, attn_blocks=(1, 3)), Action(ActionKind.BLOCK, block_range=(1, 4))][obs.step % 3]

    def reset(self):
        pass


def test_fused_path_runs_what_a_prologue_probe_picks():
    """Note [fused path equals unfused path] when the action is only known after the probe
    head: attention reuse and range skips picked there run exactly as in the unfused path."""
    torch.manual_seed(0)
    model = Net(depth=5).eval()
    fused = _generation(model, _ProbeThenAny(), {}, True)
    plain = _generation(model, _ProbeThenAny(), {}, False)
    assert {a for a, _ in fused[1]} == {"FULL", "STEP", "ATTN(1,3)", "BLOCK(1-4)"}
    assert fused[1] == plain[1]
    assert all(torch.equal(a, b) for a, b in zip(fused[0], plain[0]))
