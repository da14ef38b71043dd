"""Note [bounded trace]: the trace keeps the newest entries only; stats() stays exact."""

from __future__ import annotations

import pytest
import torch

import mixcache_compile
from mixcache_compile import CacheSession
from mixcache_compile.runtime.trace_log import DEFAULT_TRACE_LIMIT, TraceLog
from tests.tiny_models import wan


def test_trace_log_keeps_the_newest_entries():
    log = TraceLog(DEFAULT_TRACE_LIMIT)
    for i in range(DEFAULT_TRACE_LIMIT + 5):
        log.append(i)
    assert DEFAULT_TRACE_LIMIT == 10_000
    assert len(log) == 10_000 and log.dropped == 5
    assert log[0] == 5 and log[-1] == 10_004
    assert log[:3] == [5, 6, 7] and log[-2:] == [10_003, 10_004] and log[::5000] == [5, 5005]
    log.clear()
    assert len(log) == 0 and log.dropped == 0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_a_bad_trace_limit_is_refused(bad):
    with pytest.raises(ValueError, match="trace_limit must be a positive int"):
        CacheSession("none", trace_limit=bad)


def test_session_trace_is_bounded_and_stats_stay_exact():
    schedule = {s: "step" for s in range(1, 8, 2)}
    bounded, unbounded = CacheSession("static", schedule=schedule, trace_limit=5), CacheSession("static", schedule=schedule, trace_limit=None)
    runs = []
    for session in (bounded, unbounded):
        model, make = wan()
        compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"}, fullgraph=True)
        with torch.no_grad():
            for generation in range(2):
                for step in range(6):
                    with session.context("cond", step_index=step):
                        compiled(**make(1, seed=step, t=900.0 - 100 * step))
        runs.append(session)
    assert len(unbounded.trace) == 12 and unbounded.trace.dropped == 0
    assert len(bounded.trace) == 5 and bounded.trace.dropped == 7
    assert list(bounded.trace) == unbounded.trace[-5:]  # the newest five, in order
    stats, want = bounded.stats(), unbounded.stats()
    assert stats.pop("trace_dropped") == 7 and want.pop("trace_dropped") == 0
    assert stats == want and stats["calls"] == 12 and stats["actions"] == {"FULL": 6, "STEP": 6}


def test_enable_passes_the_trace_limit_on():
    model, make = wan()
    session = mixcache_compile.enable(model, policy="none", engine="eager", trace_limit=3)
    with torch.no_grad():
        for step in range(4):
            with session.context("cond", step_index=step):
                session.compiled(**make(1, seed=step))
    assert session.trace.limit == 3 and [e.step for e in session.trace] == [1, 2, 3]
    assert session.stats()["calls"] == 4
