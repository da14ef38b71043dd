"""Pipeline wiring: how a cache session is attached to a model and hears its pipeline.

Three callers share these steps, so they cannot drift apart:
  * ``api.enable`` compiles a pipeline's transformer for good;
  * ``export.capture`` compiles it for one recorded example call, then puts everything back;
  * ``export.runtime.ExportedTransformer`` has no compiled module, but answers the pipeline's
    ``cache_context`` calls the same way (``announce_call``).

The steps: find the transformer (``find_transformer``); compile it with the ``mixcache``
backend (``compile_with_session``, which also marks the batch dimension dynamic for
batch-concatenated CFG, ``mark_batch_dynamic``); let the session hear the pipeline's
``cache_context(name, step_index=, num_inference_steps=)`` calls (``wire_cache_context``);
remember which session caches which model (``attach_session`` / ``session_of``).

Note [session lookup]: which session caches a model is kept in a weak mapping here, not on the
module, so a model carries no mixcache attribute and the entry goes with the model. The one
thing that must sit on the module is the ``cache_context`` wrapper: the pipeline calls
``transformer.cache_context(...)``, and only the module's own attribute can answer it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .branches import BATCHED_CONTEXT_NAMES
from .runtime.session import CacheSession

# model -> its session, both held weakly: the session keeps its compiled wrapper, which keeps
# the model, so a strong value would keep every enabled model alive for the process life. The
# model's own entry code (runtime/entry.py) keeps the session alive as long as the model.
_SESSIONS: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref[CacheSession]] = weakref.WeakKeyDictionary()


def find_transformer(obj: Any) -> tuple[torch.nn.Module, Any]:
    """``(model, owner)``: a bare module is its own model (owner None); a pipeline's model is
    its ``transformer`` and the pipeline is the owner whose ``transformer`` gets replaced."""
    if isinstance(obj, torch.nn.Module):
        return obj, None
    model = getattr(obj, "transformer", None)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{type(obj).__name__} has no `transformer` module; pass the pipeline or the model itself")
    return model, obj


def session_of(model: torch.nn.Module) -> CacheSession | None:
    """The session ``enable`` attached to ``model``, or None (Note [session lookup])."""
    held = _SESSIONS.get(model)
    return held() if held is not None else None


def attach_session(model: torch.nn.Module, session: CacheSession) -> None:
    """Remember that ``session`` caches ``model``; held weakly by the model (Note [session lookup])."""
    _SESSIONS[model] = weakref.ref(session)


def pipeline_does_cfg(pipe: Any) -> bool:
    """Whether a batch-concatenating pipeline is running CFG now (its guidance scale > 1).
    Pipelines expose it as ``do_classifier_free_guidance`` or only keep ``_guidance_scale``."""
    flag = getattr(pipe, "do_classifier_free_guidance", None)
    if isinstance(flag, bool):
        return flag
    scale = getattr(pipe, "_guidance_scale", None)
    return isinstance(scale, (int, float)) and scale > 1.0


@contextlib.contextmanager
def announce_call(
    session: CacheSession, pipe: Any, name: str, kwargs: dict[str, Any], *, batched_without_pipe: bool = False
) -> Iterator[None]:
    """Tell ``session`` what a pipeline's ``cache_context(name, **kwargs)`` says: the step, the
    branch, and for a batch-concatenated name whether it carries both branches now (asked of
    ``pipe``; ``batched_without_pipe`` when there is no pipeline to ask)."""
    batched = None
    if name in BATCHED_CONTEXT_NAMES:
        batched = pipeline_does_cfg(pipe) if pipe is not None else batched_without_pipe
    # Pipelines that announce no step count (CogVideoX) still record it before the loop.
    num_steps = kwargs.get("num_inference_steps") or getattr(pipe, "_num_timesteps", None)
    with session.context(name, kwargs.get("step_index"), num_steps, batched):
        yield


def wire_cache_context(model: torch.nn.Module, session: CacheSession, pipe: Any) -> Callable[[], None]:
    """Wrap the model's ``cache_context`` so the session hears what the pipeline says.

    diffusers pipelines open ``transformer.cache_context(name, step_index=, num_inference_steps=,
    sigma=)`` around each denoiser call; we pass it on to the original (diffusers' own hooks
    keep working) and tell the session the step and branch. A model without ``cache_context``
    is left alone. Returns a function that puts the model's ``cache_context`` back as it was.
    """
    if not hasattr(model, "cache_context"):
        return lambda: None
    had_own = "cache_context" in model.__dict__
    own = model.__dict__.get("cache_context")
    original = model.cache_context

    @contextlib.contextmanager
    def cache_context(name: str, **kwargs: Any) -> Iterator[None]:
        with announce_call(session, pipe, name, kwargs):
            with original(name, **kwargs):
                yield

    model.cache_context = cache_context

    def unwire() -> None:
        if had_own:
            model.cache_context = own
        else:
            del model.cache_context

    return unwire


def mark_batch_dynamic(session: CacheSession) -> Callable[[torch.nn.Module, tuple, dict], None]:
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


def backend_options(model: torch.nn.Module, session: CacheSession, engine: str) -> dict[str, Any]:
    """The ``options`` of ``torch.compile(model, backend="mixcache", options=...)`` for ``session``:
    the model class's ``_repeated_blocks`` (diffusers names its block classes there) go along."""
    options: dict[str, Any] = {"session": session, "engine": engine}
    repeated = getattr(type(model), "_repeated_blocks", None)
    if repeated:
        options["repeated_blocks"] = list(repeated)
    return options


def compile_with_session(model: torch.nn.Module, session: CacheSession, engine: str, fullgraph: bool = True) -> torch.nn.Module:
    """``torch.compile`` the model with the mixcache backend driven by ``session``, with the
    batch-dynamic pre-hook (``mark_batch_dynamic``) on the compiled wrapper."""
    options = backend_options(model, session, engine)
    compiled = torch.compile(model, backend="mixcache", options=options, fullgraph=fullgraph)
    compiled.register_forward_pre_hook(mark_batch_dynamic(session), with_kwargs=True)
    return compiled
