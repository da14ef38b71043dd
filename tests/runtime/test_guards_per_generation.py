"""Calls that run a graph without Dynamo after the generation's first call passed its guards
(runtime/shortcut.py, Note [guards once per generation]) give exactly what the same calls
give through Dynamo on every call: same outputs bit for bit, same decisions and statistics;
and a call that differs from the validated one in what the Note lists goes through Dynamo."""

from __future__ import annotations

import copy

import pytest
import torch

import mixcache_compile
from mixcache_compile import CacheSession
from mixcache_compile.backend import BackendOptions
from mixcache_compile.runtime.entry import entry_of
from tests.tiny_models import wan

STEPS = 5
POLICIES = {"none": {}, "static": {"every": 2}, "teacache": {"threshold": 0.5}}


def _compiled(model: torch.nn.Module, guards: str, policy: str, **options):
    session = CacheSession(policy, **options)
    module = torch.compile(model, backend="mixcache", fullgraph=True,
                           options={"session": session, "engine": "eager", "guards": guards})
    return module, session


def _generate(module, session: CacheSession, make, latent_view=None) -> list[torch.Tensor]:
    """A separate-CFG loop; every call's output. ``latent_view(step, latent)``: what the loop
    passes as hidden_states at that step (a view with other strides, say)."""
    cond, uncond = make(1, seed=1), make(1, seed=2)
    latent = make(1, seed=3)["hidden_states"]
    outputs = []
    with torch.no_grad():
        for step in range(STEPS):
            t = torch.tensor([900.0 - 150 * step])
            hidden = latent_view(step, latent) if latent_view is not None else latent
            for branch, inputs in (("cond", cond), ("uncond", uncond)):
                with session.context(branch, step_index=step, num_inference_steps=STEPS):
                    outputs.append(module(**{**inputs, "hidden_states": hidden, "timestep": t})[0])
            latent = latent - 0.2 * outputs[-1]
    return outputs


def _graph_calls(session: CacheSession) -> int:
    """Calls that ran a graph (not a whole-step reuse or CFG rebuild, not a probe's skip)."""
    return sum(1 for e in session.trace if not e.action.startswith(("STEP", "CFG")))


def _trace(session: CacheSession) -> list[tuple]:
    return [(e.generation, e.step, e.branch, e.action, e.requested, e.fallback) for e in session.trace]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_direct_calls_equal_dynamo_on_every_call_bit_for_bit(policy: str):
    model, make = wan()
    fast_model, slow_model = copy.deepcopy(model), copy.deepcopy(model)
    fast, fast_session = _compiled(fast_model, "per_generation", policy, **POLICIES[policy])
    slow, slow_session = _compiled(slow_model, "every_call", policy, **POLICIES[policy])
    generations = 3
    for _ in range(generations):
        for a, b in zip(_generate(fast, fast_session, make), _generate(slow, slow_session, make)):
            assert torch.equal(a, b)
    assert _trace(fast_session) == _trace(slow_session)
    for key in ("computed_fraction", "actions", "flops_run", "flops_full", "calls", "bypassed_calls"):
        assert fast_session.stats()[key] == slow_session.stats()[key], key
    fast_entry, slow_entry = entry_of(fast_model), entry_of(slow_model)
    assert slow_entry.direct_calls == 0
    # Only the first call of each generation goes through the entry to Dynamo; every other
    # call that runs a graph runs directly (calls that run none are answered ahead, as before).
    # The very first call is traced before the entry exists (the backend form installs it
    # while tracing), so generation 1's first call through the entry is its second.
    assert fast_entry.checked_calls == generations
    assert fast_entry.direct_calls == _graph_calls(fast_session) - generations - 1 > 0


def test_other_strides_mid_generation_go_through_dynamo():
    """A hidden_states view with the validated shape but other strides must not reach the
    graph compiled for the old ones directly: Dynamo sees it (and recompiles)."""
    model, make = wan()
    fast_model, slow_model = copy.deepcopy(model), copy.deepcopy(model)
    fast, fast_session = _compiled(fast_model, "per_generation", "none")
    slow, slow_session = _compiled(slow_model, "every_call", "none")

    def transposed_at_3(step: int, latent: torch.Tensor) -> torch.Tensor:
        # same shape, same values, strides of a transposed copy (H and W are equal)
        return latent.transpose(-1, -2).contiguous().transpose(-1, -2) if step == 3 else latent

    _generate(fast, fast_session, make), _generate(slow, slow_session, make)
    before = entry_of(fast_model).checked_calls
    got = _generate(fast, fast_session, make, transposed_at_3)
    want = _generate(slow, slow_session, make, transposed_at_3)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # Through Dynamo: the generation's first call; step 3's cond (new strides: a recompile,
    # a new runner) and uncond (the form is learned again for that runner); step 4's two
    # calls alike (the old strides: back to the first graph). The rest ran directly.
    assert entry_of(fast_model).checked_calls - before == 5


def test_a_parameter_replaced_between_generations_is_the_one_used():
    model, make = wan()
    fast_model, slow_model = copy.deepcopy(model), copy.deepcopy(model)
    fast, fast_session = _compiled(fast_model, "per_generation", "static", every=2)
    slow, slow_session = _compiled(slow_model, "every_call", "static", every=2)
    first = _generate(fast, fast_session, make)
    _generate(slow, slow_session, make)
    for m in (fast_model, slow_model):
        m.proj_out.weight = torch.nn.Parameter(m.proj_out.weight.detach() * 0.5)
    got, want = _generate(fast, fast_session, make), _generate(slow, slow_session, make)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not torch.equal(got[-1], first[-1])
    assert entry_of(fast_model).direct_calls > 0


def test_guards_option_is_checked():
    model, _ = wan()
    with pytest.raises(TypeError, match="guards"):
        BackendOptions.parse({"session": CacheSession("none"), "guards": "never"})
    with pytest.raises(ValueError, match="guards"):
        mixcache_compile.enable(model, "none", engine="eager", guards="never")
