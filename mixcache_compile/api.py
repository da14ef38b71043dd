"""``enable``: one call to cache a diffusers pipeline (or a bare transformer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .engines import ENGINES
from .parallel import prepare_context_parallel
from .policies import DEFAULT_POLICY, PolicyConfig, Policy
from .runtime.entry import ON_BYPASS, install_entry
from .runtime.session import CacheSession

# Pipelines that batch both CFG branches into one call name that call "cond_uncond"
# (CogVideoX); separate-branch pipelines (Wan, Flux true-CFG) say "cond" / "uncond".
_BATCHED_CONTEXT_NAMES = {"cond_uncond"}


def enable(
    pipe_or_model: Any,
    policy: str | PolicyConfig | Policy = DEFAULT_POLICY,
    engine: str = "inductor",
    *,
    cfg: str = "auto",
    fullgraph: bool = True,
    on_bypass: str = "warn",
    **policy_options: Any,
) -> CacheSession:
    """Compile ``pipe.transformer`` (or the model itself) with the mixcache backend and wire
    the session to the pipeline's ``cache_context`` calls. ``policy``: a config
    (``enable(pipe, FbCacheConfig(threshold=0.1))``), or a name with its options as keywords
    (``enable(pipe, "fbcache", threshold=0.1)`` builds that config), or a policy object.
    Returns the session (``summary()``, ``stats()``, ``trace``, ``reset()``). The pipeline keeps working as before; its transformer is
    replaced by the compiled module.

    The model gets a ``forward`` code object of its own, so other compiled copies of its class
    in the process cannot make Dynamo skip it (Note [own entry code]); a call that still does
    not reach the session is counted in ``stats()["bypassed_calls"]`` and, by ``on_bypass``,
    warned about ("warn", once per generation) or raised ("raise").
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(sorted(ENGINES))}")
    if on_bypass not in ON_BYPASS:
        raise ValueError(f"on_bypass must be one of {ON_BYPASS}, got {on_bypass!r}")
    model, owner = _find_transformer(pipe_or_model)
    if getattr(model, "_mixcache_session", None) is not None:
        raise RuntimeError("mixcache is already enabled on this model; use the session it returned")
    session = CacheSession(policy, cfg=cfg, **policy_options)
    bind = getattr(session.policy, "bind_model", None)
    if callable(bind):  # a policy whose defaults depend on the weights (mixcache's calibration per model)
        bind(model)
    # Before torch.compile: OptimizedModule calls model.__call__, which looks up the
    # instance's forward at call time, so every compiled call enters through our own code.
    install_entry(model, session, on_bypass)
    options = {"session": session, "engine": engine}
    repeated = getattr(type(model), "_repeated_blocks", None)
    if repeated:
        options["repeated_blocks"] = list(repeated)
    compiled = torch.compile(model, backend="mixcache", options=options, fullgraph=fullgraph)
    compiled.register_forward_pre_hook(_mark_batch_dynamic(session), with_kwargs=True)
    prepare_context_parallel(compiled, session)  # no-op without diffusers context parallelism
    if hasattr(model, "cache_context"):
        _wire_cache_context(model, session, owner)
    model._mixcache_session = session
    if owner is not None:
        setattr(owner, "transformer", compiled)
    session.compiled = compiled
    return session


def _find_transformer(obj: Any) -> tuple[torch.nn.Module, Any]:
    if isinstance(obj, torch.nn.Module):
        return obj, None
    model = getattr(obj, "transformer", None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{type(obj).__name__} has no `transformer` module; pass the pipeline or the model itself")
    return model, obj


def _wire_cache_context(model: torch.nn.Module, session: CacheSession, pipe: Any) -> None:
    """Wrap the model's ``cache_context`` so the session hears what the pipeline says.

    diffusers pipelines open ``transformer.cache_context(name, step_index=, num_inference_steps=,
    sigma=)`` around each denoiser call; we pass it on to the original (diffusers' own hooks
    keep working) and tell the session the step and branch.
    """
    original = model.cache_context

    @contextlib.contextmanager
    def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
        batched = None
        if name in _BATCHED_CONTEXT_NAMES:
            batched = _pipeline_does_cfg(pipe)
        # Pipelines that announce no step count (CogVideoX) still record it before the loop.
        num_steps = kwargs.get("num_inference_steps") or getattr(pipe, "_num_timesteps", None)
        with session.context(name, kwargs.get("step_index"), num_steps, batched):
            with original(name, **kwargs):
                yield

    model.cache_context = cache_context


def _pipeline_does_cfg(pipe: Any) -> bool:
    """Whether a batch-concatenating pipeline is running CFG now (its guidance scale > 1).
    Pipelines expose it as ``do_classifier_free_guidance`` or only keep ``_guidance_scale``."""
    flag = getattr(pipe, "do_classifier_free_guidance", None)
    if isinstance(flag, bool):
        return flag
    scale = getattr(pipe, "_guidance_scale", None)
    return isinstance(scale, (int, float)) and scale > 1.0


def _mark_batch_dynamic(session: CacheSession) -> Any:
    """Batch-concatenated CFG needs a batch-symbolic trace, so the cond half can run alone.

    This pre-hook runs eagerly on the compiled wrapper, before Dynamo sees the call, and
    marks dim 0 of every tensor argument of the batch size dynamic.
    """

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ctx = getattr(session._local, "ctx", None)
        if not ((ctx is not None and ctx.batched) or session.cfg == "batched"):
            return
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0]
        if not tensors:
            return
        batch = tensors[0].shape[0]
        if batch < 2 or batch % 2:
            return
        for t in tensors:
            if t.shape[0] == batch:
                torch._dynamo.mark_dynamic(t, 0)

    return hook
