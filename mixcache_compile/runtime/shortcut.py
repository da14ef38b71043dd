"""Calls answered in the model's entry frame, without entering Dynamo.

Note [answered ahead]: a call whose action the policy knows before any graph runs and that
runs no graph (a whole-step reuse, ``Runs.NOTHING``, or a CFG rebuild, ``Runs.REBUILD``)
needs nothing Dynamo does: no guard, no frame, no graph. Yet every such call under
``torch.compile`` pays Dynamo's frame and its guards (about 1700 of them for a small Wan:
one per parameter, its dims, module attributes, the attention registry), which measured
0.3 ms with warm CPU caches and 0.9 ms right after a computed call, most of a skipped
call's cost. So the model's entry frame (``entry.py``, run eagerly) asks the session first:
the session resolves the call's position, decides, and if the action runs no graph it
answers with its cached tensors; otherwise it keeps the decided call for the runner that
the compiled frame reaches next (``CacheSession._take_pending``), so nothing is decided twice.
A prologue probe (TeaCache's) runs here too, on its compiled probe-head stage, and a reuse it
decides is answered the same way (Note [probe ahead] in ``ahead.py``).

Skipping the guards is safe for exactly these calls: their output is a cached tensor (or a
rebuild from cached tensors), which the Dynamo path would have returned as well whatever
the guards said; every call that runs a graph still goes through Dynamo and its guards.

What the entry needs to talk to the session the way the runner does, it learns from the
first call of each *call form* (the argument names, which are tensors, and the values of
the others) that went through Dynamo, and checks before trusting it:
  * the graph's inputs by their Dynamo sources (``L['kwargs']['timestep']``, ...), evaluated
    on the bound arguments: they must give the very tensors the runner received;
  * the return value: the compiled frame builds it from the runner's outputs (a tuple, a
    ``Transformer2DModelOutput``); every tensor in it must be one of those outputs (by
    identity), every other leaf a plain constant.
Anything else (a frame that mutates state outside its graph, an argument that is not a
tensor or a plain constant, a source that does not evaluate) leaves the shortcut off for that
form: the call goes through Dynamo as before.

Note [guards once per generation]: a call that runs a graph goes through Dynamo for its
guards, about 1700 checks for a small Wan (every parameter's dims and strides, module
attributes, the attention registry) that cost 0.75-1 ms a call against a 7 ms call on the
shipped model: the same for plain ``torch.compile``, and the largest fixed cost either has.
With ``guards="per_generation"`` (the default) only the first call of each generation pays
them: the entry runs every later call of the generation on the runner directly, with the
graph inputs read through their sources (so a parameter replaced in place is the one
passed), when all of these hold, and else goes through Dynamo as before:
  * a call of the same form went through Dynamo *in this generation* and reached this
    runner (``validate``): whatever Dynamo's guards check about the model (its parameters,
    hooks, attention processors, LoRA layers, training flag) held at this generation's start;
  * the call is not the first of a generation (the session's position says so);
  * the global modes Dynamo guards (grad, inference mode, autocast, Dynamo's stance) and every
    tensor input's dtype, and the user tensors' shapes, strides and devices, are the ones
    that validated call had (``_direct_key``; a new shape then recompiles through Dynamo).
What is not checked between a generation's calls is the model's structure (a hook added, a
processor swapped, an attribute Dynamo guards changed in the middle of a denoising loop):
the contract is that the model stays as it is during a generation, as every cache already
assumes; a change between generations is seen by the next generation's first call.
``guards="every_call"`` keeps Dynamo's guards on every call that runs a graph.
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

log = logging.getLogger(__name__)

MISSING: Any = object()  # "not answered here": the caller goes through Dynamo
_PLAIN = (type(None), bool, int, float, str)
_TENSOR = "<tensor>"
CallForm = tuple


def call_form(args: Sequence[Any], kwargs: dict[str, Any]) -> CallForm | None:
    """What decides the compiled frame's output structure besides tensor shapes: positions
    and names of the tensor arguments and the values of the others. None: an argument that
    is neither a tensor nor a plain constant (its contents could change unseen)."""
    form: list[Any] = []
    for value in args:
        if isinstance(value, torch.Tensor):
            form.append(_TENSOR)
        elif type(value) in _PLAIN:
            form.append(value)
        else:
            return None
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            form.append((name, _TENSOR))
        elif type(value) in _PLAIN:
            form.append((name, value))
        else:
            return None
    return tuple(form)


def _getter(sources: Sequence[str]) -> Callable[[dict, dict], tuple[Any, ...]]:
    """``(L, G) -> tuple`` evaluating Dynamo source names (``L['kwargs']['x']``, ``G['y']``)."""
    return eval("lambda L, G: (" + "".join(f"{s}, " for s in sources) + ")", {})  # noqa: S307 - names Dynamo wrote


@dataclass
class _Learned:
    """One call form: which runner its graph is, how to find the inputs the session reads,
    and how the compiled frame builds its return value from the runner's outputs."""

    runner: Any
    sources: list[str]  # every graph input's source, checked against the runner's arguments
    callback: Any  # Dynamo's frame callback of the compile that reached ``runner`` (kept alive: its id is a key)
    user_tensors: Callable[[dict, dict], tuple[Any, ...]]
    timestep: Callable[[dict, dict], tuple[Any, ...]] | None
    leaves: tuple[Any, ...]  # per leaf of the return value: an output index (int) or ("const", value)
    spec: Any
    inputs: Callable[[dict, dict], tuple[Any, ...]]  # every graph input, in placeholder order
    dtypes: Callable[[Sequence[Any]], tuple[Any, ...]]  # inputs -> the tensor inputs' dtypes
    # Note [guards once per generation]: the generation a call of this form last passed
    # Dynamo's guards and reached ``runner`` in, and what that call looked like
    validated: int | None = None
    direct_key: tuple | None = None
    _getters: dict = field(default_factory=dict)

    def graph_inputs(self, L: dict, G: dict) -> Callable[[Sequence[int]], tuple[Any, ...]]:
        """``placeholder indices -> values`` for this call (Note [probe ahead]); the getter
        for each index set is made once."""
        def fetch(slots: Sequence[int]) -> tuple[Any, ...]:
            key = tuple(slots)
            getter = self._getters.get(key)
            if getter is None:
                getter = self._getters[key] = _getter([self.sources[i] for i in key])
            return getter(L, G)

        return fetch

    def build(self, outputs: Sequence[Any]) -> Any:
        return pytree.tree_unflatten([outputs[j] if type(j) is int else j[1] for j in self.leaves], self.spec)


class Shortcut:
    """What the entry of one model learned to answer calls ahead (Note [answered ahead])."""

    def __init__(self, func: Callable[..., Any], bound: bool, direct: bool = True) -> None:
        self.skip = 1 if bound else 0  # the model itself comes first in a bound forward's arguments
        self.direct = direct  # Note [guards once per generation]
        self.direct_calls = 0
        self.off: str | None = None  # why the shortcut is off for this model, if it is
        # By (Dynamo callback, call form): two torch.compile wrappers of one model (two
        # sessions) reach different runners; each call is answered by its own compile's runner.
        self.forms: dict[tuple[int, CallForm], _Learned] = {}
        self._refused: set[tuple[int, CallForm]] = set()
        self._plans: dict[tuple[int, tuple[str, ...]], _BindPlan] = {}
        try:
            self.signature = inspect.signature(func, follow_wrapped=False)
        except (TypeError, ValueError) as err:
            self.off = f"the forward's signature cannot be read ({err})"
            return
        code = getattr(func, "__code__", None)
        closure = getattr(func, "__closure__", None) or ()
        self.globals = getattr(func, "__globals__", {})
        # A frame's locals at entry hold its free variables too (Dynamo's guards read them).
        self.free = {name: cell.cell_contents for name, cell in zip(code.co_freevars, closure)} if code else {}

    def locals_of(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The entry frame's locals as Dynamo names them in its sources (``L[...]``): what
        ``signature.bind`` + ``apply_defaults`` give, by a plan made once per call shape."""
        key = (len(args), tuple(kwargs))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _bind_plan(self.signature, len(args), tuple(kwargs))
        frame = {name: _FETCH[how](what, args, kwargs) for name, how, what in plan}
        frame.update(self.free)
        return frame

    # ---- the hot path --------------------------------------------------------------------
    def answer(self, args: Sequence[Any], kwargs: dict[str, Any], callback: Any) -> tuple[Any, Any]:
        """``(value, session)``: the call's return value if the session of the runner this
        compile reaches answers it without a graph, else MISSING (that session may then hold
        the decided call for its runner, see the Note); the session asked, or None."""
        form = call_form(args[self.skip:], kwargs)
        key = (id(callback), form)
        learned = self.forms.get(key) if form is not None else None
        if learned is None or learned.callback is not callback:
            return MISSING, None
        session = learned.runner.session
        if not (session.may_answer_ahead or self.direct):
            return MISSING, None
        if learned.runner is not session.bound_runner:
            # Dynamo recompiled (a new shape): the next call through it teaches the new runner.
            del self.forms[key]
            return MISSING, None
        L = self.locals_of(args, kwargs)
        tensors = learned.user_tensors(L, self.globals)
        signature = tuple((tuple(t.shape), t.dtype) for t in tensors)
        timestep = learned.timestep

        def timestep_value() -> float | None:
            if timestep is None:
                return None
            t = timestep(L, self.globals)[0]
            return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)

        outputs = session.answer_ahead(learned.runner, signature, timestep_value, learned.graph_inputs(L, self.globals))
        if outputs is None and self.direct:
            outputs = self._run_direct(learned, session, L, tensors)
        return (MISSING if outputs is None else learned.build(outputs)), session

    def _run_direct(self, learned: _Learned, session: Any, L: dict, tensors: Sequence[Any]) -> Any:
        """The runner's outputs for a call that runs a graph, run without Dynamo, or None
        (Note [guards once per generation])."""
        if learned.validated != session.generation:
            return None
        call = session.pending_call(learned.runner)
        if call is None or call.pos.new_generation:
            return None
        inputs = learned.inputs(L, self.globals)
        if _direct_key(learned.dtypes(inputs), tensors) != learned.direct_key:
            return None
        self.direct_calls += 1
        return learned.runner(*inputs)

    def validate(self, args: Sequence[Any], kwargs: dict[str, Any], callback: Any, runner: Any) -> None:
        """After a call through Dynamo that reached ``runner``: calls of its form may run
        directly for the rest of this generation (Note [guards once per generation])."""
        if not self.direct or self.off is not None:
            return
        form = call_form(args[self.skip:], kwargs)
        learned = self.forms.get((id(callback), form)) if form is not None else None
        if learned is None or learned.runner is not runner:
            return
        L = self.locals_of(args, kwargs)
        inputs = learned.inputs(L, self.globals)
        learned.direct_key = _direct_key(learned.dtypes(inputs), learned.user_tensors(L, self.globals))
        learned.validated = runner.session.generation

    # ---- learning from a call that went through Dynamo -----------------------------------
    def learn(self, args: Sequence[Any], kwargs: dict[str, Any], out: Any, captured: tuple | None, callback: Any) -> None:
        """After a call through Dynamo that reached exactly one runner (``captured``: the
        runner, the arguments it got and what it returned), learn its form if it checks."""
        if self.off is not None:
            return
        form = call_form(args[self.skip:], kwargs)
        key = (id(callback), form)
        if form is None or key in self.forms or key in self._refused:
            return
        why = self._why_not(args, kwargs, out, captured, key, callback)
        if why is not None:
            self._refused.add(key)
            log.info("mixcache: calls of this form go through Dynamo every time: %s", why)

    def _why_not(self, args: Sequence[Any], kwargs: dict[str, Any], out: Any, captured: tuple | None,
                 key: tuple[int, CallForm], callback: Any) -> str | None:
        if captured is None:
            return "the call did not reach exactly one mixcache runner"
        runner, graph_args, graph_outputs = captured
        sources = getattr(runner, "arg_sources", None)
        if sources is None or getattr(runner, "frame_side_effects", True):
            return "the traced frame has no input sources or changes state outside its graph"
        try:
            L = self.locals_of(args, kwargs)
            user = _getter([sources[i] for i in runner.inputs.user_tensors])
            timestep = _getter([sources[runner.inputs.timestep]]) if runner.inputs.timestep is not None else None
            found = _getter(sources)(L, self.globals)
        except Exception as err:  # noqa: BLE001 - a source we cannot evaluate: no shortcut
            return f"an input source does not evaluate ({type(err).__name__}: {err})"
        same = [a is b if isinstance(b, torch.Tensor) else (type(a) is type(b) and a == b) for a, b in zip(found, graph_args)]
        if len(found) != len(graph_args) or not all(same):
            return "the input sources do not give the runner's arguments"
        leaves, spec = pytree.tree_flatten(out)
        index = {id(o): j for j, o in enumerate(graph_outputs) if isinstance(o, torch.Tensor)}
        mapped: list[Any] = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if id(leaf) not in index:
                    return "the return value holds a tensor that is not a graph output"
                mapped.append(index[id(leaf)])
            elif type(leaf) in _PLAIN:
                mapped.append(("const", leaf))
            else:
                return f"the return value holds a {type(leaf).__name__}"
        tensor_slots = [i for i, a in enumerate(graph_args) if isinstance(a, torch.Tensor)]
        self.forms[key] = _Learned(runner, list(sources), callback, user, timestep, tuple(mapped), spec, _getter(sources),
                                   _dtypes_of(tensor_slots))
        return None


# How one parameter of a bound call gets its value: a positional argument, a keyword argument,
# its default (the very object ``apply_defaults`` would put there), or the *args / **kwargs
# collected from the call.
_BindPlan = tuple
_FETCH: dict[str, Callable[[Any, Sequence[Any], dict[str, Any]], Any]] = {
    "pos": lambda i, args, kwargs: args[i],
    "kw": lambda name, args, kwargs: kwargs[name],
    "default": lambda value, args, kwargs: value,
    "varpos": lambda span, args, kwargs: tuple(args[span[0]:span[1]]),
    "varkw": lambda names, args, kwargs: {n: kwargs[n] for n in names},
}


class _Marker:
    __slots__ = ("where",)

    def __init__(self, where: int | str) -> None:
        self.where = where


def _bind_plan(signature: inspect.Signature, nargs: int, names: tuple[str, ...]) -> _BindPlan:
    """Bind markers in place of the arguments once (raising what a call of this shape raises),
    and read off where each parameter's value comes from."""
    bound = signature.bind(*(_Marker(i) for i in range(nargs)), **{n: _Marker(n) for n in names})
    bound.apply_defaults()
    plan = []
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            where = [m.where for m in value]
            plan.append((name, "varpos", (where[0], where[-1] + 1) if where else (nargs, nargs)))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            plan.append((name, "varkw", tuple(m.where for m in value.values())))
        elif isinstance(value, _Marker):
            plan.append((name, "pos" if isinstance(value.where, int) else "kw", value.where))
        else:
            plan.append((name, "default", value))
    return tuple(plan)


def _global_modes() -> tuple[Any, ...]:
    """The global state Dynamo's guards check that a denoising loop could change (grad and
    inference mode, autocast) and Dynamo's stance (``set_stance("force_eager")`` must win)."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
            torch.is_autocast_enabled("cuda"), torch._dynamo.eval_frame._stance)


def _dtypes_of(slots: Sequence[int]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """``inputs -> tuple of dtypes`` of the inputs at ``slots`` (the tensors), at C speed."""
    pick = operator.itemgetter(*slots) if len(slots) > 1 else (lambda xs: tuple(xs[i] for i in slots))  # (one: not a tuple)
    dtype = operator.attrgetter("dtype")
    return lambda inputs: tuple(map(dtype, pick(inputs)))


def _direct_key(dtypes: tuple[Any, ...], user_tensors: Sequence[Any]) -> tuple:
    """What a direct call must share with the call that passed Dynamo's guards this generation
    (Note [guards once per generation]): the global modes, every tensor input's dtype (a
    parameter cast in place would otherwise be read as the compiled dtype), and the user tensors' shapes, strides and devices
    (parameters' are asserted by the compiled code)."""
    return (_global_modes(), dtypes, tuple((t.shape, t.stride(), t.device) for t in user_tensors))
