"""Through real diffusers pipelines: WanPipeline (separate CFG calls) and CogVideoXPipeline
(batch-concatenated CFG). No recompiles after the first call, both branches tracked, a
second generation resets the state, and policy ``none`` equals the uncompiled pipeline."""

from __future__ import annotations

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import mixcache_compile
from mixcache_compile.runtime.entry import entry_of
from tests.tiny_models import cogvideox, wan

STEPS = 20


def _compiled_graphs(pipe) -> int:
    """Dynamo's compiled entries on the model's own forward code (Note [own entry code]): one
    per graph it traced; a recompile adds one. (Dynamo's global ``unique_graphs`` counter
    also counts the empty frame through which calls answered in the entry pass, compiled
    once per process.)"""
    model = getattr(pipe.transformer, "_orig_mod", pipe.transformer)  # enable() put the compiled module there
    return len(_debug_get_cache_entry_list(entry_of(model).func.__code__))


def _wan_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    model, _ = wan()
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def _wan_call(pipe, seed: int = 0):
    g = torch.Generator().manual_seed(100)
    embeds = torch.randn(1, 5, 16, generator=g)
    negative = torch.randn(1, 5, 16, generator=g)
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=64, width=64, num_frames=5,
                num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).frames


def test_wan_pipeline_separate_cfg():
    pipe = _wan_pipe()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = _wan_call(pipe)
    session = mixcache_compile.enable(pipe, policy="none", engine="eager")
    with torch.no_grad():
        first = _wan_call(pipe)
    assert _compiled_graphs(pipe) == 1, "recompiled during the generation"
    torch.testing.assert_close(first, reference, rtol=0, atol=1e-5)
    trace = session.trace
    assert len(trace) == 2 * STEPS
    assert [(e.step, e.branch) for e in trace[:4]] == [(0, "cond"), (0, "uncond"), (1, "cond"), (1, "uncond")]
    assert {e.generation for e in trace} == {0}
    with torch.no_grad():
        second = _wan_call(pipe, seed=1)
    assert _compiled_graphs(pipe) == 1
    assert session.trace[2 * STEPS].generation == 1 and session.trace[2 * STEPS].step == 0
    assert session.stats()["generations"] == 2
    assert not torch.equal(first, second)


def test_wan_pipeline_static_reuse_resets_between_generations():
    """A schedule that reuses: the second generation never reuses the first one's tensors,
    so running it after a first generation equals running it in a fresh pipeline."""
    schedule = {s: "step" for s in range(3, STEPS - 2, 2)} | {(s, "uncond"): "cfg" for s in range(4, STEPS - 2, 2)}
    fresh_pipe = _wan_pipe()
    fresh_pipe.set_progress_bar_config(disable=True)
    fresh = mixcache_compile.enable(fresh_pipe, policy="static", engine="eager", schedule=schedule)
    with torch.no_grad():
        want = _wan_call(fresh_pipe, seed=1)
    pipe = _wan_pipe()
    pipe.set_progress_bar_config(disable=True)
    session = mixcache_compile.enable(pipe, policy="static", engine="eager", schedule=schedule)
    with torch.no_grad():
        _wan_call(pipe, seed=0)
        got = _wan_call(pipe, seed=1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [e.action for e in session.trace[2 * STEPS:]] == [e.action for e in fresh.trace]
    assert session.stats()["actions"]["STEP"] > 0 and session.stats()["actions"]["CFG"] > 0
    assert not session.stats()["fallbacks"]


def _cog_pipe():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    model, _ = cogvideox()
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=CogVideoXDDIMScheduler())


def _cog_call(pipe, seed: int = 0):
    g = torch.Generator().manual_seed(7)
    return pipe(prompt_embeds=torch.randn(1, 6, 16, generator=g), negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).frames


def test_cogvideox_pipeline_batched_cfg():
    pipe = _cog_pipe()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        reference = _cog_call(pipe)
    schedule = {s: "cfg" for s in range(4, STEPS - 2, 3)}
    session = mixcache_compile.enable(pipe, policy="static", engine="eager", schedule=schedule)
    with torch.no_grad():
        cached = _cog_call(pipe)
        again = _cog_call(pipe)
    assert _compiled_graphs(pipe) == 1, "recompiled during the generations"
    torch.testing.assert_close(cached, again, rtol=0, atol=0)  # second generation reset
    trace = session.trace
    assert {e.branch for e in trace} == {"batch"}
    assert [e.step for e in trace[:STEPS]] == list(range(STEPS))
    assert [e.action for e in trace[:STEPS]].count("CFG") == len(schedule)
    assert not session.stats()["fallbacks"]
    assert 0.5 < session.stats()["computed_fraction"] < 1.0
    # Reusing the unconditional branch is an approximation: close to, not equal to, uncached.
    assert (cached - reference).abs().max().item() > 0


class _RecordingPolicy:
    """Always FULL; remembers what it observed."""

    name = "recording"

    def __init__(self) -> None:
        self.seen = []

    def needs(self, model):
        from mixcache_compile.policies.protocol import CacheNeeds

        return CacheNeeds()

    def decide(self, obs):
        from mixcache_compile.policies.protocol import FULL

        self.seen.append(obs)
        return FULL

    def reset(self) -> None:
        pass


def test_batched_pipeline_reports_the_step_count():
    """CogVideoX's cache_context carries no step count; enable() reads the pipeline's own."""
    pipe = _cog_pipe()
    pipe.set_progress_bar_config(disable=True)
    policy = _RecordingPolicy()
    mixcache_compile.enable(pipe, policy=policy, engine="eager")
    with torch.no_grad():
        pipe(prompt_embeds=torch.randn(1, 6, 16), negative_prompt_embeds=torch.randn(1, 6, 16), height=64, width=64,
             num_frames=5, num_inference_steps=6, guidance_scale=5.0, output_type="latent")
    assert [(o.step, o.branch, o.num_steps) for o in policy.seen] == [(i, "batch", 6) for i in range(6)]
