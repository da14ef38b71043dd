"""Calls answered in the model's entry without Dynamo (runtime/shortcut.py, Note [answered
ahead]) give exactly what the same calls give through Dynamo: same outputs bit for bit, same
decisions, same statistics; and only calls whose action runs no graph are answered there."""

from __future__ import annotations

import copy

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from mixcache_compile import CacheSession
from mixcache_compile.runtime.entry import entry_of
from tests.tiny_models import wan

STEPS = 6
# step reuse (answered ahead), CFG rebuild (answered ahead), block reuse (runs a graph)
SCHEDULE = {2: "step", (3, "uncond"): "cfg", 4: "block:1-3", 5: "step"}


def _compiled(model: torch.nn.Module, answer_ahead: bool, policy: str = "static", **options):
    session = CacheSession(policy, **options)
    module = torch.compile(model, backend="mixcache", fullgraph=True,
                           options={"session": session, "engine": "eager", "answer_ahead": answer_ahead})
    return module, session


def _generate(module, session: CacheSession, make, **extra) -> list:
    """A separate-CFG loop of STEPS steps; every call's output."""
    cond, uncond = make(1, seed=1), make(1, seed=2)
    latent = make(1, seed=3)["hidden_states"]
    outputs = []
    with torch.no_grad():
        for step in range(STEPS):
            t = torch.tensor([900.0 - 100 * step])
            for branch, inputs in (("cond", cond), ("uncond", uncond)):
                with session.context(branch, step_index=step, num_inference_steps=STEPS):
                    outputs.append(module(**{**inputs, "hidden_states": latent, "timestep": t, **extra}))
            latent = latent - 0.1 * outputs[-1][0]
    return outputs


def _run_both(policy: str = "static", generations: int = 2, **options):
    model, make = wan()
    results = []
    for answer_ahead in (True, False):
        copy_of_model = copy.deepcopy(model)
        module, session = _compiled(copy_of_model, answer_ahead, policy, **options)
        outs = [_generate(module, session, make) for _ in range(generations)]
        results.append((outs, session, entry_of(copy_of_model)))
    return results


def _no_graph_calls(session: CacheSession) -> int:
    """Calls whose action runs no graph (a prologue probe, if any, ran ahead in the entry)."""
    return sum(1 for e in session.trace if e.action.startswith(("STEP", "CFG")))


def _trace(session: CacheSession) -> list[tuple]:
    return [(e.generation, e.step, e.branch, e.action, e.requested, e.fallback) for e in session.trace]


def test_answered_ahead_equals_the_dynamo_path_bit_for_bit():
    (fast, fast_session, fast_entry), (slow, slow_session, slow_entry) = _run_both(schedule=SCHEDULE)
    for gen_fast, gen_slow in zip(fast, slow):
        for a, b in zip(gen_fast, gen_slow):
            assert torch.equal(a[0], b[0])
    assert _trace(fast_session) == _trace(slow_session)
    for key in ("computed_fraction", "actions", "flops_run", "flops_full", "calls", "bypassed_calls"):
        assert fast_session.stats()[key] == slow_session.stats()[key], key
    assert slow_entry.answered_ahead == 0
    # Every call that runs no graph is answered ahead (the first call, computed in full,
    # teaches the entry the call form), and no other.
    assert fast_entry.answered_ahead == _no_graph_calls(fast_session) > 0


def test_every_call_form_is_learned_and_answered_with_its_own_return_structure():
    model, make = wan()
    module, session = _compiled(model, True, schedule=SCHEDULE)
    as_tuple = _generate(module, session, make)
    as_output = _generate(module, session, make, return_dict=True)
    assert all(isinstance(o, tuple) for o in as_tuple)
    assert all(isinstance(o, Transformer2DModelOutput) for o in as_output)
    for a, b in zip(as_tuple, as_output):
        assert torch.equal(a[0], b.sample)
    entry = entry_of(model)
    assert len(entry.shortcut.forms) == 2
    assert entry.answered_ahead == _no_graph_calls(session)


def test_a_call_with_an_argument_that_could_change_unseen_always_goes_through_dynamo():
    model, make = wan()
    reference, ref_session = _compiled(copy.deepcopy(model), False, schedule=SCHEDULE)
    module, session = _compiled(model, True, schedule=SCHEDULE)
    got = _generate(module, session, make, attention_kwargs={})  # a dict: its contents could change
    want = _generate(reference, ref_session, make, attention_kwargs={})
    assert entry_of(model).answered_ahead == 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want))
    assert session.stats()["actions"].get("STEP", 0) > 0


def test_a_new_shape_goes_through_dynamo_and_recompiles():
    model, make = wan()
    reference, ref_session = _compiled(copy.deepcopy(model), False, every=2)
    module, session = _compiled(model, True, every=2)
    _generate(module, session, make)
    _generate(reference, ref_session, make)
    answered = entry_of(model).answered_ahead
    assert answered > 0

    def bigger(batch: int = 1, seed: int = 0, t: float = 500.0):
        inputs = make(batch, seed, t)
        return {**inputs, "hidden_states": torch.randn(batch, 4, 2, 16, 8, generator=torch.Generator().manual_seed(seed))}

    got, want = _generate(module, session, bigger), _generate(reference, ref_session, bigger)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want))
    assert got[0][0].shape[-2] == 16
    # the first step reuse of the new shape is answered ahead again once it was computed in full
    assert entry_of(model).answered_ahead > answered


def test_mixcache_answers_the_second_branch_of_a_skipped_step_ahead():
    (fast, fast_session, fast_entry), (slow, slow_session, _) = _run_both("mixcache", threshold=0.5)
    for gen_fast, gen_slow in zip(fast, slow):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(gen_fast, gen_slow))
    assert _trace(fast_session) == _trace(slow_session)
    assert fast_session.stats()["computed_fraction"] == slow_session.stats()["computed_fraction"]
    # the first call of a step probes (ahead, in the entry: Note [probe ahead]); the reuse it
    # decides, and the one it decides for the step's second call, are answered there
    assert fast_entry.answered_ahead == _no_graph_calls(fast_session) > 0
    assert any(e.indicator is not None and e.action.startswith("STEP") for e in fast_session.trace)


def test_two_compiles_of_one_model_answer_each_from_their_own_session():
    """Two torch.compile wrappers of one model object, two sessions with different schedules,
    calls interleaved: each call is answered by its own compile's session (found by Dynamo's
    frame callback), equal to the same schedules on two separate models."""
    model, make = wan()
    other = {1: "step", 3: "step", (4, "uncond"): "cfg"}
    separate_a, session_sa = _compiled(copy.deepcopy(model), False, schedule=SCHEDULE)
    separate_b, session_sb = _compiled(copy.deepcopy(model), False, schedule=other)
    shared_a, session_a = _compiled(model, True, schedule=SCHEDULE)
    shared_b, session_b = _compiled(model, True, schedule=other)
    for _ in range(2):
        got_a, got_b = _generate(shared_a, session_a, make), _generate(shared_b, session_b, make)
        want_a, want_b = _generate(separate_a, session_sa, make), _generate(separate_b, session_sb, make)
        assert all(torch.equal(x[0], y[0]) for x, y in zip(got_a, want_a))
        assert all(torch.equal(x[0], y[0]) for x, y in zip(got_b, want_b))
    assert _trace(session_a) == _trace(session_sa) and _trace(session_b) == _trace(session_sb)
    assert entry_of(model).answered_ahead == _no_graph_calls(session_a) + _no_graph_calls(session_b) > 0


def test_teacache_probes_ahead_and_answers_its_skips_without_dynamo():
    """Note [probe ahead]: TeaCache's prologue probe runs in the entry; a skip it decides is
    answered there, a computed call resumes after the probe group (the probe runs once:
    same FLOPs as through Dynamo)."""
    (fast, fast_session, fast_entry), (slow, slow_session, _) = _run_both("teacache", threshold=0.5)
    for gen_fast, gen_slow in zip(fast, slow):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(gen_fast, gen_slow))
    assert _trace(fast_session) == _trace(slow_session)
    for key in ("computed_fraction", "flops_run", "actions"):
        assert fast_session.stats()[key] == slow_session.stats()[key], key
    skips = sum(1 for e in fast_session.trace if e.action.startswith("STEP"))
    # every skip after the entry learned the call form (the first call) was answered ahead
    assert fast_entry.answered_ahead == skips > 0


def test_more_cached_models_than_dynamos_recompile_limit_all_cache():
    """Dynamo counts cache entries with different backends on one code object against
    ``recompile_limit`` (8), dead models' included. Two code objects used to collect one
    entry per cached model: the identity frame answered calls pass through (now one per
    entry) and, in this backend form, the class's shared ``forward`` code the first call is
    compiled on (now released at the next call, Note [first call on the shared code]). From
    the limit-th model on, every call failed under ``fullgraph=True`` (found by a 15-point
    threshold sweep in one process). The limit is lowered to 2 so that three models cross it."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    model, make = wan()
    shared_code = type(model).forward.__code__
    reference = None
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(3):
            copy_of_model = copy.deepcopy(model)
            module, session = _compiled(copy_of_model, True, schedule=SCHEDULE)
            outputs = _generate(module, session, make)
            assert entry_of(copy_of_model).answered_ahead == _no_graph_calls(session) > 0
            assert session.stats()["bypassed_calls"] == 0
            assert len(_debug_get_cache_entry_list(shared_code)) == 0
            reference = reference or outputs
            assert all(torch.equal(a[0], b[0]) for a, b in zip(outputs, reference))
