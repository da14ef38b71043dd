"""Issue #10 item 1: caching must not switch off silently beside other compiled copies of the
model's class (Note [own entry code], Note [bypass detector] in runtime/entry.py).

The mix: a plain compiled copy, a diffusers-hooked compiled copy (whose failed compile makes
Dynamo mark the class-shared ``forward``/decorator code object "skip"), a cache-dit copy,
two ``enable()``d pipelines and one ``torch.compile(backend="mixcache")`` copy, generations
interleaved. Every session must see every call (2 x steps per generation) and every
generation must equal the first one exactly (same seed, so same decisions, same output).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

import mixcache_compile
from mixcache_compile import CacheSession
from mixcache_compile.runtime.entry import BypassError
from tests.tiny_models import wan

STEPS = 4


def _pipe(num_layers: int = 3):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    model, _ = wan(num_layers)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(100)
    embeds, negative = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=64, width=64, num_frames=5,
                    num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames


def _others() -> list:
    """Compiled copies of the same class that do not use mixcache. The plain copy uses Dynamo's
    ``eager`` backend: what disengaged caching was Dynamo's handling of the shared frame, which
    does not depend on the backend (an inductor variant of this test ran until 11-30 late;
    it cost a cold inductor compile, 45-75 s of the suite, for the same check)."""
    from diffusers import FirstBlockCacheConfig

    plain = _pipe()
    plain.transformer = torch.compile(plain.transformer, backend="eager", fullgraph=True)
    hooked = _pipe()
    hooked.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    hooked.transformer = torch.compile(hooked.transformer, backend="eager")
    copies = [plain, hooked]
    if importlib.util.find_spec("cache_dit") is not None:
        from mixcache_compile.eval import peers

        dit = _pipe()
        peers.CacheDitDBCachePeer(residual_diff_threshold=0.5, max_warmup_steps=1).enable(
            dit, peers.PeerContext(STEPS))
        dit.transformer = torch.compile(dit.transformer, backend="eager")
        copies.append(dit)
    return copies


def _interleaved(ours: list[tuple], others: list, generations: int = 3) -> None:
    firsts: dict[int, torch.Tensor] = {}
    for gen in range(generations):
        for i, (pipe, session) in enumerate(ours):
            out = _generate(pipe)
            assert session.stats()["calls"] == 2 * STEPS * (gen + 1), f"pipeline {i}, generation {gen}: a call bypassed its session"
            assert session.stats()["bypassed_calls"] == 0
            if gen == 0:
                firsts[i] = out
            else:
                assert torch.equal(out, firsts[i]), f"pipeline {i}, generation {gen} differs from the first"
        for other in others:
            _generate(other)


def _backend_form(engine: str) -> tuple:
    pipe = _pipe()
    session = CacheSession("static", every=2)
    pipe.transformer = torch.compile(pipe.transformer, backend="mixcache", fullgraph=True,
                                     options={"session": session, "engine": engine, "on_bypass": "raise"})
    return pipe, session


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_enabled_pipelines_keep_caching_beside_other_compiled_copies_eager():
    """Contains COMPILE.md's minimal trigger (an enabled pipeline, then a diffusers-hooked
    compiled copy of the class): every generation after the first runs after the others."""
    static, teacache, backend_form = _pipe(), _pipe(), _backend_form("eager")
    ours = [
        (static, mixcache_compile.enable(static, policy="static", engine="eager", every=2, on_bypass="raise")),
        (teacache, mixcache_compile.enable(teacache, policy="teacache", engine="eager", threshold=0.1, on_bypass="raise")),
        backend_form,
    ]
    _interleaved(ours, _others(), generations=2)
    # Caching really engaged (the bug left the output equal to the uncached one).
    assert ours[0][1].stats()["actions"].get("STEP", 0) > 0
    assert ours[2][1].stats()["actions"].get("STEP", 0) > 0
    # The backend form traced twice (class code, then its own copy) but kept one runner.
    assert len(backend_form[1].runners()) == 1


class _NoBlocks(torch.nn.Module):
    """Nothing to cache: the backend falls back to a plain graph that never calls the session."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).sin()


def test_a_call_that_skips_the_session_is_detected():
    """A compiled call that runs outside the mixcache graph (here: the backend's fallback for
    a graph it cannot plan) must raise (on_bypass="raise") or warn and be counted ("warn")."""
    x = torch.randn(2, 4)
    for on_bypass in ("raise", "warn"):
        model = _NoBlocks()
        reference = model(x)
        session = mixcache_compile.enable(model, policy="none", engine="eager", on_bypass=on_bypass)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(x)  # the uncompiled model: no Dynamo callback, so not a bypass
            assert session.stats()["bypassed_calls"] == 0
            if on_bypass == "raise":
                with pytest.raises(BypassError, match="did not reach its"):
                    session.compiled(x)
            else:
                torch.testing.assert_close(session.compiled(x), reference, rtol=0, atol=1e-6)
        if on_bypass == "warn":
            assert any(issubclass(w.category, RuntimeWarning) and "did not reach" in str(w.message) for w in caught)
        assert any("not caching this graph" in str(w.message) for w in caught)
        assert session.stats()["bypassed_calls"] == 1 and session.stats()["calls"] == 0


def test_many_enabled_models_of_one_class_need_no_global_dynamo_config():
    """Each model has its own code object, so more enabled models of one class than Dynamo's
    recompile_limit (lowered to 2 here to keep the test short; the default is 8) all compile,
    and enable() leaves the global Dynamo config alone."""
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=2):
        sessions = []
        for _ in range(3):
            model, make = wan(2)
            session = mixcache_compile.enable(model, policy="none", engine="eager", on_bypass="raise")
            with torch.no_grad():
                session.compiled(**make(1))
            sessions.append(session)
        assert torch._dynamo.config.recompile_limit == 2
    assert torch._dynamo.config.recompile_limit == limit
    assert [s.stats()["calls"] for s in sessions] == [1] * 3
