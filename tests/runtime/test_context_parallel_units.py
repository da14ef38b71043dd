"""Single-process pieces of the context-parallel wiring (the two-process runs are in
test_context_parallel.py): the shard-layout guard, hooked module paths, no-op wiring."""

from __future__ import annotations

import pytest
import torch

import mixcache_compile
from mixcache_compile.parallel import prepare_context_parallel
from mixcache_compile.passes.context_parallel_hooks import unhook_path
from mixcache_compile.passes.module_stack import normalise_path
from tests.tiny_models import wan


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda r: torch.cat([r, r], dim=1),  # a full-length residual against a half-length stream
        lambda r: r[:, :1],  # a shape that would broadcast silently
    ],
    ids=["full-vs-shard", "broadcastable"],
)
def test_a_cached_residual_of_another_layout_is_refused(make_bad):
    model, make = wan()
    session = mixcache_compile.enable(model, policy="static", engine="eager", schedule={1: "block:0-2"})
    with torch.no_grad():
        with session.context("cond", step_index=0):
            session.compiled(**make(seed=0))
        key = ("res", "cond", 0, 2, 0)
        good = session._store.get(key)
        assert good is not None and good.dim() == 3
        session._store.put(key, make_bad(good.clone()))
        with pytest.raises(RuntimeError, match="residual of blocks 0-2: cached shape"):
            with session.context("cond", step_index=1):
                session.compiled(**make(seed=0))


def test_paths_through_diffusers_hooks_name_the_plain_module():
    hooked_child = (
        "L['function_reference'].forward.__self__.__dict__['_modules']['blocks'].0"
        ".forward.func.__closure__[0].cell_contents.forward.__self__.attn1"
    )
    assert normalise_path(unhook_path(hooked_child)) == "blocks.0.attn1"
    plain_child = "L['function_reference'].forward.__self__.__dict__['_modules']['blocks'].1.attn1"
    assert normalise_path(unhook_path(plain_child)) == "blocks.1.attn1"
    assert unhook_path("L['self'].blocks.0") == "L['self'].blocks.0"


def test_wiring_is_a_no_op_without_context_parallelism():
    model, _ = wan()
    session = mixcache_compile.CacheSession("none")
    compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"})
    assert prepare_context_parallel(compiled, session) is False
    assert session.process_group is None
    assert not compiled._forward_pre_hooks
