"""Reliability: bad sharing, non-finite caches, lifecycle, threads, shape changes.

Every case ends in the right output (compared with a fresh session or eager) or in one clear
error; none may reuse a stale tensor silently.
"""

from __future__ import annotations

import threading

import pytest
import torch

from mixcache_compile import CacheSession
from tests.tiny_models import wan

SCHEDULE = {2: "step", (3, "uncond"): "cfg", 4: "block:1-3", 5: "attn:0,1"}


def _compile(model, session):
    return torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"}, fullgraph=True)


def _generation(compiled, make, session, steps: int = 6, seed: int = 0, shape=None):
    outs = []
    with torch.no_grad():
        for step in range(steps):
            kwargs = {**make(1, seed=seed + step), "timestep": torch.tensor([900.0 - 100 * step])}
            if shape is not None and step >= shape[0]:
                kwargs["hidden_states"] = torch.randn(shape[1], generator=torch.Generator().manual_seed(step))
            for branch in ("cond", "uncond"):
                with session.context(branch, step_index=step, num_inference_steps=steps):
                    outs.append(compiled(**kwargs)[0])
    return outs


def _fresh(schedule=SCHEDULE, steps: int = 6, seed: int = 0):
    model, make = wan()
    session = CacheSession("static", schedule=schedule)
    return _generation(_compile(model, session), make, session, steps, seed), session


def test_a_session_shared_by_two_models_is_refused():
    (m1, make), (m2, _) = wan(), wan(num_layers=2)
    session = CacheSession("none")
    a, b = _compile(m1, session), _compile(m2, session)
    with torch.no_grad():
        a(**make(1))
        with pytest.raises(RuntimeError, match="already drives another model"):
            b(**make(1))


def test_nan_in_a_cached_output_falls_back_and_recovers():
    model, make = wan()
    session = CacheSession("static", schedule={1: "step", 3: "step"})
    compiled = _compile(model, session)
    outs = []
    with torch.no_grad():
        for step in range(4):
            kwargs = {**make(1, seed=step), "timestep": torch.tensor([900.0 - 100 * step])}
            if step == 0:
                kwargs["hidden_states"] = torch.full_like(kwargs["hidden_states"], float("nan"))
            with session.context("cond", step_index=step):
                outs.append(compiled(**kwargs)[0])
            if step == 1:
                torch.testing.assert_close(outs[1], model(**kwargs)[0], rtol=0, atol=1e-5)
    assert session.trace[1].action == "FULL" and session.trace[1].fallback == "non-finite cached tensor"
    assert session.trace[3].action == "STEP"  # the recomputed, finite output is reused later
    assert torch.isfinite(outs[3]).all()
    assert session.stats()["non_finite"] == 1


def test_interrupted_generation_then_a_new_one_equals_a_fresh_session():
    model, make = wan()
    session = CacheSession("static", schedule=SCHEDULE)
    compiled = _compile(model, session)
    _generation(compiled, make, session, steps=3, seed=50)  # interrupted after 3 steps
    got = _generation(compiled, make, session, steps=6, seed=0)
    want, fresh = _fresh()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert [e.action for e in session.trace[6:]] == [e.action for e in fresh.trace]


def test_reset_drops_every_cache():
    model, make = wan()
    session = CacheSession("static", schedule={1: "step"})
    compiled = _compile(model, session)
    with torch.no_grad():
        with session.context("cond", step_index=0):
            compiled(**make(1))
        assert session.stats()["cache_bytes"] > 0
        session.reset()
        assert session.stats()["cache_bytes"] == 0
        with session.context("cond", step_index=1):
            out = compiled(**make(1, seed=3))[0]
    torch.testing.assert_close(out, model(**make(1, seed=3))[0], rtol=0, atol=1e-5)
    assert session.trace[-1].fallback == "no cached output for this branch"


def test_two_models_interleaved_keep_their_own_state():
    want, _ = _fresh()
    (m1, make), (m2, _) = wan(), wan()
    s1, s2 = CacheSession("static", schedule=SCHEDULE), CacheSession("static", schedule=SCHEDULE)
    c1, c2 = _compile(m1, s1), _compile(m2, s2)
    got1, got2 = [], []
    with torch.no_grad():
        for step in range(6):
            kwargs = {**make(1, seed=step), "timestep": torch.tensor([900.0 - 100 * step])}
            for branch in ("cond", "uncond"):
                for compiled, session, sink in ((c1, s1, got1), (c2, s2, got2)):
                    with session.context(branch, step_index=step):
                        sink.append(compiled(**kwargs)[0])
    for a, b, w in zip(got1, got2, want):
        torch.testing.assert_close(a, w, rtol=0, atol=0)
        torch.testing.assert_close(b, w, rtol=0, atol=0)


class _Serialised:
    """Calls a compiled model under a process-wide lock. Dynamo itself is not safe when two
    threads enter compiled frames at once (it starts tracing in the second thread); the
    session state under test (thread-local contexts, per-session caches) still interleaves
    call by call across the threads."""

    lock = threading.Lock()

    def __init__(self, compiled) -> None:
        self.compiled = compiled

    def __call__(self, **kwargs):
        with self.lock:
            return self.compiled(**kwargs)


def test_two_threads_each_with_its_own_pipeline():
    want, _ = _fresh()
    runs = []
    for _ in range(2):
        model, make = wan()
        session = CacheSession("static", schedule=SCHEDULE)
        compiled = _compile(model, session)
        with torch.no_grad(), session.context("cond", step_index=0):
            compiled(**make(1))  # trace in the main thread; threads only run compiled code
        session.reset()
        runs.append((_Serialised(compiled), make, session))
    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i, r=r: results.__setitem__(i, _generation(r[0], r[1], r[2])))
               for i, r in enumerate(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for g, w in zip(results[i], want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_shape_change_mid_generation_never_reuses_the_old_shape():
    model, make = wan()
    session = CacheSession("static", schedule={3: "step", 4: "step"})
    compiled = _compile(model, session)
    with pytest.warns(UserWarning, match="input shapes or dtypes changed"):
        outs = _generation(compiled, make, session, steps=5, shape=(3, (1, 4, 2, 4, 4)))
    assert outs[6].shape[-1] == 4  # step 3 (cond): new shape, computed in full
    assert session.trace[6].action == "FULL" and session.trace[6].fallback
    assert session.trace[8].action == "STEP"  # step 4 reuses the new-shape output
