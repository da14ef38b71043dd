"""``enable``: one call to cache a diffusers pipeline (or a bare transformer).

The steps it shares with export capture (find the transformer, compile it with a session,
wire ``cache_context``) live in ``wiring.py``.
"""

from __future__ import annotations

from typing import Any

from .engines import ENGINES
from .parallel import prepare_context_parallel
from .policies import DEFAULT_POLICY, PolicyConfig, Policy
from .runtime.entry import ON_BYPASS, install_entry
from .runtime.session import CacheSession
from .wiring import attach_session, compile_with_session, find_transformer, session_of, wire_cache_context


def enable(
    pipe_or_model: Any,
    policy: str | PolicyConfig | Policy = DEFAULT_POLICY,
    engine: str = "inductor",
    *,
    cfg: str = "auto",
    fullgraph: bool = True,
    on_bypass: str = "warn",
    answer_ahead: bool = True,
    guards: str = "per_generation",
    **policy_options: Any,
) -> CacheSession:
    """Compile ``pipe.transformer`` (or the model itself) with the mixcache backend and wire
    the session to the pipeline's ``cache_context`` calls. ``policy``: a config
    (``enable(pipe, FbCacheConfig(threshold=0.1))``), or a name with its options as keywords
    (``enable(pipe, "fbcache", threshold=0.1)`` builds that config), or a policy object.
    Returns the session (``summary()``, ``stats()``, ``trace``, ``reset()``). The pipeline keeps working as before; its transformer is
    replaced by the compiled module. Given a bare model, call ``session.compiled`` (the
    compiled module; for a pipeline it is the new ``pipe.transformer``).

    The model gets a ``forward`` code object of its own, so other compiled copies of its class
    in the process cannot make Dynamo skip it (Note [own entry code]); a call that still does
    not reach the session is counted in ``stats()["bypassed_calls"]`` and, by ``on_bypass``,
    warned about ("warn", once per generation) or raised ("raise"). ``answer_ahead``: a call
    whose action runs no graph (a step reuse, a CFG rebuild) is answered in the model's entry
    without entering Dynamo (Note [answered ahead], runtime/shortcut.py); False sends every
    call through Dynamo (same outputs, slower skipped calls). ``guards``: "per_generation"
    (the default) checks Dynamo's guards on the first call of each generation and runs the
    generation's later calls that compute without them (Note [guards once per generation],
    runtime/shortcut.py: the model must not change during a generation); "every_call" checks
    them on every call that runs a graph, as plain ``torch.compile`` does.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {', '.join(sorted(ENGINES))}")
    if on_bypass not in ON_BYPASS:
        raise ValueError(f"on_bypass must be one of {ON_BYPASS}, got {on_bypass!r}")
    model, owner = find_transformer(pipe_or_model)
    if session_of(model) is not None:
        raise RuntimeError("mixcache is already enabled on this model; use the session it returned")
    session = CacheSession(policy, cfg=cfg, **policy_options)
    session.bind_model(model)  # a policy whose defaults depend on the weights (mixcache's calibration per model)
    # Before torch.compile: OptimizedModule calls model.__call__, which looks up the
    # instance's forward at call time, so every compiled call enters through our own code.
    install_entry(model, session, on_bypass, answer_ahead, guards)
    compiled = compile_with_session(model, session, engine, fullgraph)
    prepare_context_parallel(compiled, session)  # no-op without diffusers context parallelism
    wire_cache_context(model, session, owner)
    attach_session(model, session)
    if owner is not None:
        setattr(owner, "transformer", compiled)
    session.compiled = compiled  # the handle for a bare model (nothing to replace it in)
    return session
