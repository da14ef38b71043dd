"""Shared pieces of the export tests: tiny pipelines, their call kwargs, policies to run."""

from __future__ import annotations

from typing import Any

import torch

from mixcache_compile.policies import POLICIES, _policy_class
from tests.tiny_models import cogvideox, wan

STEPS = 12

# Options that make the adaptive policies reuse something on tiny random-weight models within
# STEPS steps; the static schedules touch every action kind (3-block models).
STATIC_SEPARATE = {(1, "uncond"): "cfg", 2: "step", 3: "block:1-3", 4: "attn:0,2", (6, "cond"): "block:0-2",
                   (6, "uncond"): "cfg", 7: "step", 9: "attn:1"}
STATIC_BATCHED = {1: "cfg", 2: "step", 3: "block:1-3", 4: "attn:0,2", 6: "cfg", 7: "block:0-1", 9: "step"}
OPTIONS: dict[str, dict[str, Any]] = {
    "fbcache": {"threshold": 0.5},
    "dbcache": {"threshold": 0.5, "Fn": 1, "Bn": 1, "warmup": 1},
    "teacache": {"threshold": 0.5},
}


def policies(batched: bool) -> list[tuple[str, dict[str, Any]]]:
    """Every policy that imports in this build, with the options used on tiny models."""
    out = []
    for name in POLICIES:
        try:
            _policy_class(name)
        except ValueError:
            continue
        if name == "static":
            out.append((name, {"schedule": STATIC_BATCHED if batched else STATIC_SEPARATE}))
        else:
            out.append((name, OPTIONS.get(name, {})))
    return out


def wan_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    model, _ = wan()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_kwargs(steps: int = STEPS, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100)
    return dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
                height=64, width=64, num_frames=5, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed))


def cog_pipe():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    model, _ = cogvideox()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cog_kwargs(steps: int = STEPS, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    return dict(prompt_embeds=torch.randn(1, 6, 16, generator=g), negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                height=64, width=64, num_frames=5, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(seed))


MODELS = {"wan": (wan_pipe, wan_kwargs, False), "cogvideox": (cog_pipe, cog_kwargs, True)}


def decisions(trace) -> list[tuple]:
    return [(e.generation, e.step, e.branch, e.action, e.requested, e.fallback) for e in trace]


def wan_spec():
    """A ``module:function`` model spec for the export command: (pipeline, example call kwargs)."""
    return wan_pipe(), wan_kwargs(steps=1)
