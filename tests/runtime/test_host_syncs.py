"""Issue #10 item 4: device-to-host reads on the per-call path.

Every way a tensor's value reaches the host (``item``, ``tolist``, ``__bool__``, ``__int__``,
``__float__``, ``cpu``, ``numpy``) is counted while the session handles a call. Host copies
made asynchronously when caches are stored (Note [finite flags off the per-call path]) are
not device reads and are not counted. Expected: none on a call whose action is known in
advance (policy none, static schedules, with check_finite on), exactly one per probe decision.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import mixcache_compile
from mixcache_compile.runtime.entry import entry_of
from mixcache_compile.runtime.host_flags import HOST_COPY_ATTR
from mixcache_compile.runtime.session import CacheSession
from tests.runtime.test_disengagement import STEPS, _generate, _pipe

_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")


@contextmanager
def _count_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Yields a list: reads made during each session call, in call order."""
    per_call: list[int] = []
    inside = [False]

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if inside[0] and not getattr(self, HOST_COPY_ATTR, False):
                per_call[-1] += 1
            return original(self, *args, **kwargs)

        return read

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    # A call reaches the session once: through ``answer_ahead`` (in the model's entry,
    # runtime/shortcut.py) and, unless answered there, through ``_run_call``; a call that
    # ``answer_ahead`` decided and left pending continues in ``_run_call`` as the same call.
    run_call, answer_ahead = CacheSession._run_call, CacheSession.answer_ahead

    def counted_call(self, runner, args):
        if getattr(self._local, "pending", None) is None:
            per_call.append(0)
        inside[0] = True
        try:
            return run_call(self, runner, args)
        finally:
            inside[0] = False

    def counted_answer(self, runner, sig, timestep, graph_inputs=None):
        per_call.append(0)
        inside[0] = True
        try:
            outputs = answer_ahead(self, runner, sig, timestep, graph_inputs)
        finally:
            inside[0] = False
        if outputs is None and getattr(self._local, "pending", None) is None:
            assert per_call.pop() == 0  # declined before deciding: not a call of its own
        return outputs

    monkeypatch.setattr(CacheSession, "_run_call", counted_call)
    monkeypatch.setattr(CacheSession, "answer_ahead", counted_answer)
    yield per_call


@pytest.mark.parametrize("policy, options", [("none", {}), ("static", {"every": 2})])
def test_no_device_read_on_calls_whose_action_is_known(monkeypatch, policy, options):
    pipe = _pipe()
    session = mixcache_compile.enable(pipe, policy=policy, engine="eager", **options)
    assert session.check_finite
    _generate(pipe)  # first generation: compiles
    with _count_reads(monkeypatch) as per_call:
        _generate(pipe)
    assert per_call == [0] * (2 * STEPS)
    if policy == "static":
        assert session.stats()["actions"].get("STEP", 0) > 0  # reuse (and its finiteness check) happened
        model = getattr(pipe.transformer, "_orig_mod", pipe.transformer)
        assert entry_of(model).answered_ahead > 0  # ... in the model's entry, without Dynamo


# mixcache with its trigger on (tau): the trigger reads the probe's indicator, not the outputs'
# deviations, so a probe call still makes one read and the other calls none (issue #10 item 4).
@pytest.mark.parametrize("policy, options", [("teacache", {"threshold": 0.1}), ("fbcache", {}),
                                             ("mixcache", {"threshold": 0.2}), ("mixcache", {"threshold": 0.2, "tau": 0.5})])
def test_one_device_read_per_probe_decision(monkeypatch, policy, options):
    pipe = _pipe()
    session = mixcache_compile.enable(pipe, policy=policy, engine="eager", **options)
    _generate(pipe)
    start = len(session.trace)
    with _count_reads(monkeypatch) as per_call:
        _generate(pipe)
    probed = [e.indicator is not None for e in session.trace[start:]]
    assert len(per_call) == len(probed) == 2 * STEPS
    assert per_call == [int(p) for p in probed]
    assert any(probed)
