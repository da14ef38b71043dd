"""Pipeline wiring (``mixcache_compile/wiring.py``) and the weak session holders.

``enable`` leaves no mixcache attribute on the model but its ``cache_context`` wrapper, finds
its session again through a weak mapping, and the backend's per-options-dict sessions are
held weakly (they go when nothing else holds them)."""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch

import mixcache_compile
from mixcache_compile import backend
from mixcache_compile.branches import BATCHED_CONTEXT_NAMES, CONTEXT_BRANCHES
from mixcache_compile.runtime.session import CacheSession
from mixcache_compile.wiring import announce_call, attach_session, session_of, wire_cache_context
from tests.tiny_models import wan


def test_enable_finds_its_session_without_an_attribute_on_the_model():
    torch.set_num_threads(1)
    model, make = wan(num_layers=2)
    with torch.no_grad():
        expected = model(**make(seed=1))[0]
    before = set(model.__dict__)
    session = mixcache_compile.enable(model, policy="none", engine="eager")
    assert session_of(model) is session
    added = set(model.__dict__) - before
    assert not any("session" in name for name in added), added  # the lookup is not an attribute
    with pytest.raises(RuntimeError, match="already enabled"):
        mixcache_compile.enable(model, policy="none", engine="eager")
    with torch.no_grad():
        got = session.compiled(**make(seed=1))[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_session_lookup_is_weak_on_both_sides():
    model = torch.nn.Linear(2, 2)
    session = CacheSession("none")
    attach_session(model, session)
    assert session_of(model) is session
    del session
    gc.collect()
    assert session_of(model) is None  # the mapping does not keep the session alive
    other, kept = torch.nn.Linear(2, 2), CacheSession("none")
    attach_session(other, kept)
    gone = weakref.ref(other)
    del other
    gc.collect()
    assert gone() is None  # nor the model


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.opened: list[tuple[str, dict]] = []

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        self.opened.append((name, kwargs))
        yield


class _Session:
    """Records what ``session.context`` is told (the same signature as CacheSession.context)."""

    def __init__(self) -> None:
        self.told: list[tuple] = []

    @contextlib.contextmanager
    def context(self, name=None, step_index=None, num_inference_steps=None, batched=None):
        self.told.append((name, step_index, num_inference_steps, batched))
        yield


class _Pipe:
    do_classifier_free_guidance = True
    _num_timesteps = 7


def test_wired_cache_context_tells_the_session_and_unwires_cleanly():
    model, session, pipe = _Model(), _Session(), _Pipe()
    unwire = wire_cache_context(model, session, pipe)  # type: ignore[arg-type]
    assert "cache_context" in model.__dict__
    with model.cache_context("cond_uncond", step_index=3):
        pass
    with model.cache_context("cond", step_index=4, num_inference_steps=9):
        pass
    assert session.told == [("cond_uncond", 3, 7, True), ("cond", 4, 9, None)]
    assert [n for n, _ in model.opened] == ["cond_uncond", "cond"]  # diffusers' own context still opens
    unwire()
    assert "cache_context" not in model.__dict__
    assert wire_cache_context(torch.nn.Linear(1, 1), session, pipe)() is None  # nothing to wire, nothing to undo


def test_announce_call_without_a_pipeline_uses_the_given_default():
    session = _Session()
    with announce_call(session, None, "cond_uncond", {"step_index": 0}, batched_without_pipe=True):  # type: ignore[arg-type]
        pass
    with announce_call(session, None, "uncond", {"step_index": 0}):  # type: ignore[arg-type]
        pass
    assert session.told == [("cond_uncond", 0, None, True), ("uncond", 0, None, None)]


def test_one_branch_table():
    assert BATCHED_CONTEXT_NAMES == {"cond_uncond"}
    assert CONTEXT_BRANCHES["negative"] == "uncond" and CONTEXT_BRANCHES["positive"] == "cond"


def test_backend_sessions_by_options_dict_are_held_weakly():
    options = {"policy": "none"}
    first = backend._session_for(options, "none")
    assert backend._session_for(options, "none") is first  # one session per options dict
    assert backend._session_for({"policy": "none"}, "none") is not first  # another dict, another session
    gc.collect()
    key = id(options)
    assert key in backend._SESSIONS_BY_OPTIONS
    del first
    gc.collect()
    assert key not in backend._SESSIONS_BY_OPTIONS  # gone with its session
