"""The action description (policies/actions.py, Note [action table]) is the one statement of
each action kind's rules: every kind has one, composites derive theirs from their parts, and
static's needs, the manifest's spelling and the runtime's availability checks agree with it."""

from __future__ import annotations

import pytest
import torch

from mixcache_compile import CacheSession
from mixcache_compile.policies.config import action_text
from mixcache_compile.policies.actions import (
    BRANCHES, RULES, Cache, CacheRef, Fresh, PartOf, Present, Runs, describe, needs_of, spelling,
)
from mixcache_compile.policies.base import PolicyBase
from mixcache_compile.policies.protocol import COND_HALF, Action, ActionKind, CacheNeeds, ModelInfo, Recorded
from mixcache_compile.policies.static import StaticConfig, StaticPolicy
from mixcache_compile.runtime.actions import Situation, refusal
from mixcache_compile.runtime.records import CacheRecords
from tests.tiny_models import wan

SAMPLE = ["full", "step", "cfg", "block:1-3", "attn:0,2", "cfg+block:1-3", "cfg+attn:0,2", "probe"]
MODEL = ModelInfo(num_blocks=4, chain_bounds=((0, 4),), reusable_ranges=frozenset({(1, 3), (0, 4)}),
                  attention_reusable=True, half_batch_available=True)


def _situation(records: CacheRecords, step: int = 3, model: ModelInfo = MODEL, after_probe: int | None = None) -> Situation:
    return Situation(records, model, step, after_probe, lambda: None)


def _required(spec) -> list[CacheRef]:
    refs = []
    for req in spec.requires:
        if isinstance(req, Present):
            refs.extend(req.refs)
        elif isinstance(req, Fresh):
            refs.append(req.ref)
        elif isinstance(req, PartOf):
            refs.extend(_required(req.spec))
    return refs


def _fill(records: CacheRecords, refs: list[CacheRef], step: int) -> None:
    for ref in refs:
        records.put(ref, [torch.ones(2, 3)], Recorded(step, True, True))


def test_every_kind_has_one_description():
    assert set(RULES) == set(ActionKind)
    for text in SAMPLE:
        action = Action.parse(text)
        for branch in (*BRANCHES, COND_HALF):
            spec = describe(action, branch)
            assert spec.action == action and spec.branch == branch


def test_composite_actions_derive_from_their_parts():
    for text, part_text in (("cfg+block:1-3", "block:1-3"), ("cfg+attn:0,2", "attn:0,2")):
        action, part = Action.parse(text), Action.parse(part_text)
        spec = describe(action, "batch")
        part_spec = describe(part, COND_HALF)
        assert spec.runs is Runs.HALF and spec.part == part_spec and spec.internals == COND_HALF
        assert (spec.skips, spec.reuses_attention) == (part_spec.skips, part_spec.reuses_attention)
        # its reads: the CFG difference, then exactly what the part reads on the cond half
        plain = describe(Action.parse("cfg"), "batch")
        assert spec.reads == plain.reads + part_spec.reads
        # on a separate uncond call the part is moot: the same as plain CFG
        assert describe(action, "uncond").reads == describe(Action.parse("cfg"), "uncond").reads


@pytest.mark.parametrize("text", SAMPLE)
def test_spelling_round_trips_and_is_the_manifest_text(text):
    action = Action.parse(text)
    assert Action.parse(spelling(action)) == action
    assert action_text(action) == spelling(action)


def test_static_needs_are_what_the_schedule_reads():
    schedule = {1: "step", (2, "uncond"): "cfg", 3: "block:1-3", 4: "attn:0,2", (5, "batch"): "cfg+attn:1"}
    needs = StaticPolicy(StaticConfig(schedule=schedule)).needs(MODEL)
    # written out by hand from the table
    assert needs.outputs and needs.cfg_delta and needs.cond_half
    assert needs.ranges == {(1, 3)} and needs.attn_blocks == {0, 1, 2}
    plain = StaticPolicy(StaticConfig(schedule={1: "cfg", 2: "block:0-4"}, reuse="full")).needs(MODEL)
    assert not plain.outputs and plain.cfg_delta and not plain.cond_half and plain.ranges == {(0, 4)}


@pytest.mark.parametrize("text", SAMPLE)
@pytest.mark.parametrize("branch", ["uncond", "batch"])
def test_runtime_availability_is_the_description(text, branch):
    """An action runs exactly when every cache its description requires is recorded (and
    fresh where it says so), and those caches are the ones ``needs_of`` asks to keep."""
    action = Action.parse(text)
    spec = describe(action, branch)
    required = _required(spec)
    needs = needs_of(action)
    for ref in required:  # everything it requires is something the needs keep
        if ref.cache is Cache.RESIDUAL:
            assert ref.index in needs.ranges
        elif ref.cache is Cache.ATTENTION:
            assert ref.index[0] in needs.attn_blocks
        elif ref.cache is Cache.DELTA:
            assert needs.cfg_delta
        if ref.branch == COND_HALF:
            assert needs.cond_half
    full = CacheRecords(check_finite=True)
    _fill(full, required, step=3)
    assert refusal(spec, _situation(full)) is None
    for missing in required:
        records = CacheRecords(check_finite=True)
        _fill(records, [r for r in required if r != missing], step=3)
        assert refusal(spec, _situation(records)) is not None, (text, branch, missing)


def test_fallback_reasons_come_from_the_description():
    records = CacheRecords(check_finite=True)
    cfg_block = Action.parse("cfg+block:1-3")
    _fill(records, [CacheRef(Cache.DELTA)], step=3)
    assert refusal(describe(cfg_block, "batch"), _situation(records)) == "cond half: no cached residual for blocks 1-3"
    assert refusal(describe(cfg_block, "cond"), _situation(records)) == "CFG reuse applies to the unconditional branch"
    no_half = ModelInfo(4, ((0, 4),), frozenset({(1, 3)}), True, False)
    assert refusal(describe(cfg_block, "batch"), _situation(records, model=no_half)) == "half batch unavailable (batch dim not symbolic)"
    # cond computed at an earlier step is not fresh for this step's CFG rebuild
    _fill(records, [CacheRef(Cache.OUTPUT, "cond")], step=2)
    assert refusal(describe(Action.parse("cfg"), "uncond"), _situation(records)) == "cond branch not computed at this step"
    assert refusal(describe(Action.parse("block:1-3"), "cond"), _situation(records, after_probe=2)) == "blocks 1-3 start before the probe point 2"
    assert refusal(describe(Action.parse("attn:0"), "cond"), _situation(records, after_probe=1)) == "attention reuse cannot follow a blocks probe"
    assert refusal(describe(Action.parse("attn:0,2"), "cond"), _situation(records)) == "no cached attention for blocks [0, 2]"


def test_records_stamp_what_the_observation_shows():
    records = CacheRecords(check_finite=False)
    ref = CacheRef(Cache.OUTPUT, "cond")
    records.put(ref, [torch.zeros(1)], Recorded(4, True, False))
    assert records.fresh(ref, 4) and not records.fresh(ref, 5)
    assert ref.name == "output:cond" and records.recorded["output:cond"] == Recorded(4, True, False)
    records.clear()
    assert not records.has(ref) and not records.recorded


class _Watching(PolicyBase):
    """Cond: FULL at steps 0 and 2, BLOCK(1-3) at step 1; uncond always FULL. Keeps what each
    call observed of the CFG difference and the cond output."""

    name = "watching"

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, bool, bool]] = []

    def needs(self, model):
        return CacheNeeds(outputs=True, cfg_delta=True, ranges={(1, 3)})

    def decide(self, obs):
        self.seen.append((obs.step, obs.branch, obs.exact("delta"), obs.fresh("output:cond")))
        return Action.parse("block:1-3") if (obs.step, obs.branch) == (1, "cond") else Action.parse("full")


def test_observation_says_what_is_fresh_and_exact():
    model, make = wan()
    policy = _Watching()
    session = CacheSession(policy)
    compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"}, fullgraph=True)
    with torch.no_grad():
        for step in range(3):
            for branch, seed in (("cond", 0), ("uncond", 1)):
                with session.context(branch, step_index=step, num_inference_steps=3):
                    compiled(**make(1, seed=seed))
    assert [e.action for e in session.trace] == ["FULL", "FULL", "BLOCK(1-3)", "FULL", "FULL", "FULL"]
    assert policy.seen == [
        (0, "cond", False, False), (0, "uncond", False, True),  # nothing yet; cond computed at step 0
        (1, "cond", True, False), (1, "uncond", True, True),  # delta of two full calls
        (2, "cond", False, False), (2, "uncond", False, True),  # step 1's delta came from a BLOCK call
    ]
