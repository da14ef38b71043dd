"""The ``mixcache`` torch.compile backend (registered as an entry point in pyproject.toml).

Dynamo hands us the traced graph; we plan it into stage graphs and return a ``StageRunner``
that the session drives call by call. A graph we cannot plan (no repeated blocks, a partial
graph after a graph break, a stage that writes its inputs) gets one warning naming why and
is compiled plainly: the output is still correct, it is just not cached.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .engines import make_engine
from .engines.base import Engine
from .parallel import check_session_group
from .passes.context_parallel_hooks import detach_context_parallel_hooks
from .passes.plan import PlanError, plan_stages
from .policies import DEFAULT_POLICY
from .runtime.entry import GUARDS, ON_BYPASS, entry_of, install_entry
from .runtime.executor import StageRunner
from .runtime.inputs import classify_inputs
from .runtime.shared_code import note_moved_on
from .runtime.session import CacheSession

log = logging.getLogger(__name__)


@dataclass
class BackendOptions:
    session: CacheSession
    engine: Engine
    repeated_blocks: list[str] | None = None
    fuse_stages: bool = True
    on_bypass: str = "warn"
    answer_ahead: bool = True
    guards: str = "per_generation"

    @staticmethod
    def parse(options: dict[str, Any] | None, mode: str | None = None) -> BackendOptions:
        """``options`` of ``torch.compile(..., backend="mixcache", options=...)``. torch.compile
        takes ``mode`` or ``options``, not both: with options, give the mode as
        ``options["mode"]``; inductor config goes in ``options["inductor"]`` (a dict)."""
        given = options
        options = dict(options or {})
        valid = {"session", "engine", "repeated_blocks", "policy", "mode", "inductor", "fuse_stages", "on_bypass", "answer_ahead", "guards"}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(f"unknown mixcache option(s) {unknown}; valid options: {sorted(valid)}")
        session = options.get("session")
        if session is None:
            session = _session_for(given, options.get("policy", DEFAULT_POLICY))
        elif not isinstance(session, CacheSession):
            raise TypeError(f"options['session'] must be a CacheSession, got {type(session).__name__}")
        elif "policy" in options:
            raise TypeError("give the policy to the CacheSession, not next to it in options")
        blocks = options.get("repeated_blocks")
        if blocks is not None and not (isinstance(blocks, (list, tuple)) and all(isinstance(b, str) for b in blocks)):
            raise TypeError("options['repeated_blocks'] must be a list of block class names")
        if "mode" in options and mode not in (None, "default"):
            raise TypeError("give the compile mode once (options['mode'] or torch.compile's mode)")
        engine = make_engine(options.get("engine", "inductor"), options.get("mode", mode), options.get("inductor"))
        fuse = options.get("fuse_stages", True)
        if not isinstance(fuse, bool):
            raise TypeError(f"options['fuse_stages'] must be a bool, got {fuse!r}")
        on_bypass = options.get("on_bypass", "warn")
        if on_bypass not in ON_BYPASS:
            raise TypeError(f"options['on_bypass'] must be one of {ON_BYPASS}, got {on_bypass!r}")
        answer_ahead = options.get("answer_ahead", True)
        if not isinstance(answer_ahead, bool):
            raise TypeError(f"options['answer_ahead'] must be a bool, got {answer_ahead!r}")
        guards = options.get("guards", "per_generation")
        if guards not in GUARDS:
            raise TypeError(f"options['guards'] must be one of {GUARDS}, got {guards!r}")
        return BackendOptions(session, engine, list(blocks) if blocks else None, fuse, on_bypass, answer_ahead, guards)


# Note [one session per options dict]: a compile without a session gets one built from its
# policy. Dynamo calls the backend again for the same model (recompiles, and the second trace
# through the model's own entry code, runtime/entry.py); every call with the same options dict
# must find the same session, or the caches and the step count would start over.
# The holder is weak: it keeps neither the dict nor the session alive (the compiled wrapper
# keeps the dict, the runners and the model's entry keep the session), and an entry goes when
# its session goes. A dict cannot be weakly referenced, so an id is trusted only while its
# session lives and the dict still holds the same values (a new dict that reuses a dead one's
# id holds other objects).
_SESSIONS_BY_OPTIONS: dict[int, tuple[tuple[tuple[str, int], ...], weakref.ref[CacheSession]]] = {}


def _options_fingerprint(options: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple((str(k), id(v)) for k, v in options.items())


def _session_for(options: dict[str, Any] | None, policy: Any) -> CacheSession:
    if options is None:
        return CacheSession(policy)
    key, fingerprint = id(options), _options_fingerprint(options)
    held = _SESSIONS_BY_OPTIONS.get(key)
    session = held[1]() if held is not None and held[0] == fingerprint else None
    if session is None:
        session = CacheSession(policy)

        def forget(ref: weakref.ref[CacheSession], key: int = key) -> None:
            if _SESSIONS_BY_OPTIONS.get(key, (None, None))[1] is ref:
                del _SESSIONS_BY_OPTIONS[key]

        _SESSIONS_BY_OPTIONS[key] = (fingerprint, weakref.ref(session, forget))
    return session


def _partial_graph_reason(gm: fx.GraphModule) -> str | None:
    """A graph Dynamo cut at a graph break covers only part of the model's forward."""
    # What to do about it: remove the break. fullgraph=True alone does not help a user here
    # (it turns the break into an error); it names the break's source line, which is how to
    # find it, so the message says that and quotes Dynamo's own reason where it has one.
    how = "remove the break to cache this model; compile with fullgraph=True to have Dynamo raise at its source line"
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None and getattr(reason, "graph_break", False):
        said = " ".join(str(getattr(reason, "reason", "") or "").split()).split(" Developer debug context")[0][:240]
        return f"the graph ends at a graph break{f' ({said})' if said else ''}; {how}"
    name = _traced_code_name()
    if name.startswith("torch_dynamo_resume_in_"):
        return f"the graph resumes after a graph break ({name}); {how}"
    return None


def _traced_frame() -> Any:
    """The root frame translator Dynamo is tracing now, or None (a direct call of the backend)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:
        return None


def _traced_code_name() -> str:
    """Name of the function Dynamo is tracing (resume functions after a break have a telltale name)."""
    tx = _traced_frame()
    return tx.f_code.co_name if tx is not None else ""


def _protect_traced_model(opts: BackendOptions) -> None:
    """Backend form (``torch.compile(model, backend="mixcache")``): give the traced model its
    own entry code for its next calls (Note [own entry code] in runtime/entry.py).

    This compile is on the code object the model's class shares; from the next call on the
    model enters through its own copy, which Dynamo traces once more (no stage is compiled
    again: the equal graph gets the first runner back, see mixcache_backend).
    ``enable()`` installs the entry before compiling, so it never takes this path."""
    tx = _traced_frame()
    if tx is None or tx.f_code.co_argcount == 0:
        return
    model = tx.f_locals.get(tx.f_code.co_varnames[0])
    if not isinstance(model, torch.nn.Module) or entry_of(model) is not None:
        return
    forward = model.forward
    if getattr(getattr(forward, "__func__", forward), "__code__", None) is not tx.f_code:
        return  # the traced frame is not this model's forward (a function compiled directly)
    opts.session.bind_model(model)  # before any call: mixcache picks this model's calibration
    entry = install_entry(model, opts.session, opts.on_bypass, opts.answer_ahead, opts.guards)
    if entry.isolated:  # Note [first call on the shared code] in runtime/shared_code.py
        entry.shared_code = tx.f_code
        note_moved_on(opts.session)


def _fallback(gm: fx.GraphModule, example_inputs: Sequence[Any], engine: Engine, why: str) -> Callable[..., Any]:
    warnings.warn(f"mixcache: not caching this graph: {why}; compiling it without caching", stacklevel=2)
    if engine.name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, list(example_inputs), config_patches=getattr(engine, "config_patches", None) or None)
    return gm.forward


def mixcache_backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict[str, Any] | None = None, mode: str | None = None
) -> Callable[..., Any]:
    """``torch.compile(model, backend="mixcache", options={"session": CacheSession(...), "engine": "eager"})``."""
    opts = BackendOptions.parse(options, mode)
    if not any(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes):
        # Nothing to compute, nothing to cache (also the identity frame a call answered
        # ahead passes through, runtime/entry.py): no plan, no warning.
        return gm.forward
    if detach_context_parallel_hooks(gm):  # diffusers context parallelism: shard-local stages
        check_session_group(gm, opts.session)
    why = _partial_graph_reason(gm)
    if why is None:
        try:
            plan = plan_stages(gm, opts.repeated_blocks)
        except PlanError as err:
            why = str(err)
    if why is not None:
        return _fallback(gm, example_inputs, opts.engine, why)
    _protect_traced_model(opts)
    inputs = classify_inputs(plan.placeholders, example_inputs)
    log.info(
        "mixcache: planned %d block(s) in %d chain(s), range reuse %s, engine %s",
        sum(len(c) for c in plan.chains), len(plan.chains), plan.range_reusable, opts.engine.name,
    )
    # Recompiles of one model see the same Parameter objects; another model does not.
    model_key = hash(tuple(id(a) for a in example_inputs if isinstance(a, torch.nn.Parameter)))
    # The backend form traces a model twice (see _protect_traced_model): the second, equal
    # graph gets the first one's runner, so nothing is compiled twice and the session keeps
    # its caches (a new runner would make it drop them).
    key = (model_key, opts.engine.name, tuple(opts.repeated_blocks or ()), gm.code, _input_signature(example_inputs))

    def make() -> StageRunner:
        runner = StageRunner(plan, opts.engine, inputs, opts.session, model_key)
        runner.fuse = opts.fuse_stages
        return runner

    runner = opts.session.runner_for(key, make)
    runner.frame_side_effects = runner.frame_side_effects or _external_side_effects()
    return runner


def _external_side_effects() -> bool:
    """Whether the frame being traced changes state outside its graph (an attribute of the
    model, a global, a hook): the compiled frame replays that after the graph, so a call
    answered without Dynamo (runtime/shortcut.py) would miss it. Objects the frame itself
    created (its return value, a temporary tensor) do not count: they reach the caller only
    as the return value, which the entry rebuilds. Unknown (no frame, another torch): True."""
    tx = _traced_frame()
    try:
        from torch._dynamo.variables.base import AttributeMutationNew, ValueMutationNew

        effects = tx.output.side_effects
        if effects.tensor_hooks or effects.save_for_backward:
            return True
        return any(not isinstance(var.mutation_type, (AttributeMutationNew, ValueMutationNew))
                   for var in effects._get_modified_vars())
    except Exception:  # noqa: BLE001 - Dynamo internals we cannot read: assume the worst
        return True


def _input_signature(example_inputs: Sequence[Any]) -> tuple:
    return tuple(
        (str(tuple(a.shape)), a.dtype, a.device.type, a.requires_grad) if isinstance(a, torch.Tensor) else repr(a)
        for a in example_inputs
    )
