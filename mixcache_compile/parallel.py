"""Caching on top of diffusers' context parallelism (``transformer.enable_parallelism``).

``enable()`` calls ``prepare_context_parallel`` for you. With ``torch.compile(model,
backend="mixcache", options={"session": session, ...})`` call it once yourself, on the
compiled module, before the first call::

    compiled = torch.compile(model, backend="mixcache", options={"session": session}, fullgraph=True)
    mixcache_compile.parallel.prepare_context_parallel(compiled, session)

It does three things, and nothing on a model without context parallelism:

1. Tells the session which ranks share one sequence (the config's flattened ring x ulysses
   mesh), so that indicators are reduced over exactly that group
   (Note [rank-consistent decisions] in ``runtime/distributed.py``).
2. Note [traceable hooks]: makes diffusers' context-parallel hooks traceable with
   ``fullgraph=True``. Two pieces of them stop Dynamo in torch 2.13:
   - ``ContextParallelSplitHook`` looks up a positional argument's index with
     ``inspect.signature`` on its first call (Dynamo cannot trace ``inspect.unwrap``). We fill
     the hooks' index cache eagerly, with the same lookup diffusers would do on that call.
   - ``_prepare_cp_input`` calls ``logger.warning_once`` when an input has fewer dims than
     planned (Wan's 1-D timestep; the input is then left whole, as eagerly). Dynamo refuses
     Logger methods unless listed in ``torch._dynamo.config.ignore_logging_functions``. We add
     the bound method of that one logger (not ``logging.Logger.warning_once``, which would
     silence every logger) and only while the compiled module is being called: a forward
     pre-hook enters ``torch._dynamo.config.patch`` and a forward hook leaves it. (Dynamo's
     config is process-wide: during such a call, another thread's compile sees the entry too.)
3. Leaves the hooks' split and gather nodes outside the blocks at planning time (the backend
   runs ``passes/context_parallel_hooks.py``), so every cached tensor is shard-local.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from .passes.context_parallel_hooks import is_context_parallel_hook_node
from .runtime.session import CacheSession


def context_parallel_config(model: torch.nn.Module) -> Any | None:
    """The model's diffusers ``ContextParallelConfig`` after ``enable_parallelism``, or None."""
    parallel = getattr(model, "_parallel_config", None)
    return getattr(parallel, "context_parallel_config", None)


def context_parallel_group(model: torch.nn.Module) -> Any | None:
    """The process group of the ranks that share one sequence (ring x ulysses), or None."""
    config = context_parallel_config(model)
    if config is None:
        return None
    mesh = getattr(config, "_flattened_mesh", None)
    if mesh is None:
        raise RuntimeError("the model's ContextParallelConfig has no mesh; call enable_parallelism() before mixcache")
    return mesh.get_group()


def _split_hooks(model: torch.nn.Module) -> Iterator[Any]:
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            if isinstance(hook, ContextParallelSplitHook):
                yield hook


def resolve_hook_signatures(model: torch.nn.Module) -> int:
    """Fill each split hook's positional-index cache eagerly (Note [traceable hooks]).
    Returns how many were filled."""
    filled = 0
    for hook in _split_hooks(model):
        metadata = hook.module_forward_metadata
        if metadata is None or metadata.cached_parameter_indices is not None:
            continue
        names = list(inspect.signature(metadata._cls.forward).parameters)[1:]  # without `self`
        metadata.cached_parameter_indices = {name: i for i, name in enumerate(names)}
        filled += 1
    return filled


@contextlib.contextmanager
def traceable_hooks() -> Iterator[None]:
    """Within: Dynamo drops the context-parallel hooks' ``warning_once`` calls (Note [traceable hooks])."""
    from diffusers.hooks.context_parallel import logger

    warn_once = getattr(logger, "warning_once", None)  # added to Logger by transformers/diffusers
    if warn_once is None:
        yield
        return
    ignored = set(torch._dynamo.config.ignore_logging_functions) | {warn_once}
    with torch._dynamo.config.patch(ignore_logging_functions=ignored):
        yield


class _TraceableDuringCalls:
    """Forward pre-hook + forward hook that hold ``traceable_hooks()`` open during each call."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _stack(self) -> list[contextlib.ExitStack]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def enter(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        scope = contextlib.ExitStack()
        scope.enter_context(traceable_hooks())
        self._stack().append(scope)

    def leave(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        stack = self._stack()
        if stack:
            stack.pop().close()


def prepare_context_parallel(compiled: torch.nn.Module, session: CacheSession) -> bool:
    """Wire ``session`` and the compiled module for a context-parallel model (see the module
    docstring). ``compiled`` is what ``torch.compile`` returned. Returns False (and changes
    nothing) when the model has no context parallelism."""
    model = getattr(compiled, "_orig_mod", compiled)
    group = context_parallel_group(model)
    if group is None:
        return False
    if getattr(compiled, "_mixcache_cp_prepared", False):
        raise RuntimeError("prepare_context_parallel was already called on this compiled module")
    session.process_group = group
    resolve_hook_signatures(model)
    scope = _TraceableDuringCalls()
    compiled.register_forward_pre_hook(scope.enter, with_kwargs=True)
    compiled.register_forward_hook(scope.leave, with_kwargs=True, always_call=True)
    compiled._mixcache_cp_prepared = True
    return True


def check_session_group(gm: fx.GraphModule, session: CacheSession) -> None:
    """At planning time: the graph holds context-parallel hooks, so the session must reduce
    over their group. Raises when it was not told the group, or was told another one."""
    hook_nodes = [n for n in gm.graph.nodes if is_context_parallel_hook_node(n)]
    if not hook_nodes:
        return
    names = {a for n in hook_nodes if n.op == "call_function" for a in n.args if _is_group_name(a)}
    if session.process_group is None:
        raise RuntimeError(
            "mixcache: this model runs diffusers context parallelism but the CacheSession does not know the "
            "context-parallel group its decisions must be reduced over; call "
            "mixcache_compile.parallel.prepare_context_parallel(compiled, session) after torch.compile "
            "(mixcache_compile.enable does this)"
        )
    if names and session.process_group.group_name not in names:
        raise RuntimeError(
            f"mixcache: the session reduces over process group {session.process_group.group_name!r} but the "
            f"model's context-parallel hooks gather over {sorted(names)}"
        )


def _is_group_name(arg: Any) -> bool:
    """Functional collectives name their group by a string argument registered with c10d."""
    if not isinstance(arg, str):
        return False
    try:
        from torch._C._distributed_c10d import _resolve_process_group

        _resolve_process_group(arg)
        return True
    except Exception:  # not a registered group name (another string argument)
        return False
