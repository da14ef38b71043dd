"""Each cached model gets an entry frame of its own, and every call through it is counted.

Note [own entry code]: Dynamo keeps its cache entries *and* its frame action (run the
compiled code, or skip the frame and run it eagerly) on the code object of the first Python
frame it intercepts. For a diffusers transformer that is ``type(model).forward`` or the
decorator ``wrapper`` in ``diffusers/utils/peft_utils.py``: one code object shared by every
instance of the class, and by every class that decorator wraps. When another compile of any
such model fails on that frame and Dynamo suppresses the error (a diffusers-hooked copy under
``torch.compile`` does: ``Unsupported hasattr call`` inside the hooks), ``convert_frame``
returns the default ``ConvertFrameReturn`` (``FrameAction.SKIP``, ``apply_to_code=True``),
and the shared code object is marked "skip" for every later frame, whatever its callback:
our compiled entry on it is never looked up again, the model runs eagerly, the session never
hears of the call, and caching is off without a word.

So the model's ``forward`` is replaced, on the instance only, by a copy of the function whose
``__code__`` is a fresh code object (``code.replace``): nothing another compile does to the
shared code object can reach it, and each enabled model keeps its Dynamo cache entries to
itself (which is also why no global ``recompile_limit`` has to grow with the number of
enabled models). The copy is reached through ``_mixcache_entry`` (one module-level function,
bound to the instance as its ``forward``), whose code object we mark
skip (``torch._dynamo.decorators.skip``: this frame runs eagerly, the frames it calls are
still intercepted), which counts the calls made under a Dynamo callback and checks that each
reached the session.

Note [bypass detector]: a call made while a Dynamo callback is installed (the model runs
under ``torch.compile``) must reach a mixcache ``StageRunner`` (which calls
:func:`note_reached`; counted per thread, so concurrent calls of other models cannot hide a
bypass). If it does not, the call ran outside the mixcache graph (a skipped or fallen-back
frame) and was not cached: that is counted in ``stats()["bypassed_calls"]`` and, as chosen
by ``on_bypass``, warned about (once per generation) or raised. A call of the model outside
any compile (no callback) is the user's eager model and is not checked.

Calls whose action runs no graph are answered in this entry without entering Dynamo at all
(Note [answered ahead], ``shortcut.py``; the session's side in ``ahead.py``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch._C._dynamo.eval_frame import get_eval_frame_callback, set_eval_frame
from torch._dynamo.decorators import skip as dynamo_skip_frame

from .shared_code import release_shared_code
from .shortcut import MISSING, Shortcut

log = logging.getLogger(__name__)

ON_BYPASS = ("warn", "raise")
GUARDS = ("per_generation", "every_call")  # Note [guards once per generation] in shortcut.py
_ENTRY_ATTR = "_mixcache_entry"
_serial = itertools.count()
_reached = threading.local()


def note_reached(runner: Any = None, args: Any = None, outputs: Any = None) -> None:
    """Called by every ``StageRunner`` call: the call reached the mixcache graph (Note [bypass
    detector]). While an entry learns a call form (Note [answered ahead]) the runner, its
    arguments and outputs are kept for it; otherwise nothing is kept alive."""
    _reached.count = getattr(_reached, "count", 0) + 1
    _reached.runner = runner
    if getattr(_reached, "capture", False):
        _reached.captured = (runner, args, outputs)


def _reached_count() -> int:
    return getattr(_reached, "count", 0)


class BypassError(RuntimeError):
    """A call of a cached model ran under torch.compile but never reached its session."""


def own_code_copy(func: types.FunctionType, tag: str) -> types.FunctionType:
    """A function equal to ``func`` but with a code object of its own (Note [own entry code]).

    ``co_qualname`` is tagged so that Dynamo logs and tracebacks show which copy ran; the
    filename, line numbers and bytecode are unchanged (Dynamo's skip rules read the filename).
    """
    code = func.__code__.replace(co_qualname=f"{func.__code__.co_qualname}[{tag}]")
    copy = types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__dict__.update(func.__dict__)
    copy.__qualname__ = code.co_qualname
    copy.__doc__ = func.__doc__
    copy.__module__ = func.__module__
    return copy


# torch.compile(fullgraph=True) counts the compiled frames a call ran and raises "found no
# compiled frames" at zero. A call answered ahead runs no model code at all (no eager
# fallback either); it passes through this identity on a fixed token, which Dynamo compiles
# once (an empty graph: no backend call, one guard) and counts. Fixed token: one cache entry
# per backend. Each entry calls its own code copy of the identity (``ModelEntry.token_frame``):
# Dynamo keys cache entries by code object *and* backend, so one shared function would gain an
# entry per enabled model and, at ``recompile_limit`` (8) models in a process, fail every later
# answered call under ``fullgraph=True`` (Note [own entry code], same reason).
_ANSWERED_TOKEN = torch.zeros(())


def _answered_ahead_frame(token: torch.Tensor) -> torch.Tensor:
    return token


class ModelEntry:
    """What :func:`install_entry` put on a model: the session it serves and the bypass count."""

    def __init__(self, session: Any, on_bypass: str, func: Callable[..., Any], bound: bool, isolated: bool,
                 guards: str = "per_generation") -> None:
        self.session = session
        self.on_bypass = on_bypass
        # The model's forward function with its own code object (or the original if it cannot
        # be copied); ``bound``: it takes the model as its first argument.
        self.func = func
        self.bound = bound
        self.isolated = isolated
        self.checked_calls = 0
        self._warned_generation: int | None = None
        # Calls answered without entering Dynamo (Note [answered ahead]); only for a forward
        # with its own code (a shared one may be skipped by Dynamo, then nothing is learned).
        self.shortcut = Shortcut(func, bound, direct=guards == "per_generation") if isolated else None
        self.answered_ahead = 0
        self.token_frame = own_code_copy(_answered_ahead_frame, f"token#{next(_serial)}")
        # The class's shared code object this model's first call was compiled on (backend form
        # only), released at its next call (Note [first call on the shared code]).
        self.shared_code: types.CodeType | None = None

    def release_shared_code(self) -> None:
        code, self.shared_code = self.shared_code, None
        previous = set_eval_frame(None)
        try:
            release_shared_code(code)
        finally:
            set_eval_frame(previous)

    def answer_ahead(self, args: tuple, kwargs: dict, callback: Any) -> tuple[Any, Any]:
        """``(value, session asked)``: the call's value without Dynamo, or MISSING (Note
        [answered ahead]). Runs with Dynamo's frame callback off: nothing here may be traced."""
        shortcut = self.shortcut
        if shortcut is None or not shortcut.forms:
            return MISSING, None
        previous = set_eval_frame(None)
        try:
            direct_before = shortcut.direct_calls
            out, asked = shortcut.answer(args, kwargs, callback)
            if out is not MISSING and shortcut.direct_calls == direct_before:
                self.answered_ahead += 1
        finally:
            set_eval_frame(previous)
        return out, asked

    @property
    def direct_calls(self) -> int:
        """Calls that ran a graph without Dynamo (Note [guards once per generation])."""
        return self.shortcut.direct_calls if self.shortcut is not None else 0

    def run_compiled(self, args: tuple, kwargs: dict, callback: Any, asked: Any) -> Any:
        """The call through Dynamo (the model's own code copy), checked by the bypass detector;
        a call form not yet learned is learned from it (Note [answered ahead]). ``asked``: the
        session ``answer_ahead`` consulted, which may hold this call's decision."""
        shortcut = self.shortcut
        # (before the first call the session's needs are unknown: learning starts with the second)
        learning = shortcut is not None and shortcut.off is None and (self.session.may_answer_ahead or shortcut.direct)
        before = _reached_count()
        if learning:
            _reached.capture, _reached.captured = True, None
        try:
            out = self.func(*args, **kwargs)
        finally:
            _reached.capture = False
            if asked is not None:
                asked.drop_pending()  # a call decided ahead that no runner took (a bypass)
        reached = _reached_count() - before
        self.after_call(before)
        if learning or (shortcut is not None and shortcut.direct and reached == 1):
            captured, _reached.captured = getattr(_reached, "captured", None), None
            previous = set_eval_frame(None)
            try:
                if learning:
                    shortcut.learn(args, kwargs, out, captured if reached == 1 else None, callback)
                if reached == 1:  # Note [guards once per generation]
                    shortcut.validate(args, kwargs, callback, _reached.runner)
            finally:
                set_eval_frame(previous)
        return out

    def after_call(self, reached_before: int) -> None:
        self.checked_calls += 1
        if _reached_count() > reached_before:
            return
        self.session._accounting.bypassed_calls += 1
        message = (
            "mixcache: a call of the cached model ran under torch.compile but did not reach its "
            f"CacheSession ({self.session._accounting.bypassed_calls} such call(s) so far): it was computed uncached. "
            "Dynamo ran the model outside the mixcache graph (a skipped frame, a fallback after a graph "
            "break, or another torch.compile wrapped around this model)."
        )
        if self.on_bypass == "raise":
            raise BypassError(message)
        generation = self.session.generation
        if self._warned_generation != generation:
            self._warned_generation = generation
            log.error(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def _mixcache_entry(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The model's ``forward`` (bound to the instance, so ``copy.deepcopy`` rebinds it to the copy)."""
    entry: ModelEntry = self.__dict__[_ENTRY_ATTR]
    if entry.bound:
        args = (self, *args)
    # Note [bypass detector]: only calls under a Dynamo callback must reach the session.
    # (Only skipped helper frames here: the first frame Dynamo traces must be the model's own copy.)
    callback = get_eval_frame_callback()
    if callback is None:
        return entry.func(*args, **kwargs)
    if entry.shared_code is not None:
        entry.release_shared_code()
    out, asked = entry.answer_ahead(args, kwargs, callback)
    if out is not MISSING:
        entry.token_frame(_ANSWERED_TOKEN)
        return out
    return entry.run_compiled(args, kwargs, callback, asked)


# Every model's entry is this one function: Dynamo runs its frame eagerly (skip) and starts
# tracing at the model's own forward copy it calls. The same for the entry's two helpers: the
# first frame Dynamo may trace is the model's own copy (``answer_ahead`` then turns the frame
# callback off altogether).
dynamo_skip_frame(_mixcache_entry)
dynamo_skip_frame(ModelEntry.answer_ahead)
dynamo_skip_frame(ModelEntry.release_shared_code)
dynamo_skip_frame(ModelEntry.run_compiled)


def entry_of(model: torch.nn.Module) -> ModelEntry | None:
    return model.__dict__.get(_ENTRY_ATTR)


def install_entry(model: torch.nn.Module, session: Any, on_bypass: str = "warn", answer_ahead: bool = True,
                  guards: str = "per_generation") -> ModelEntry:
    """Give ``model`` its own forward code object and the bypass detector (Notes [own entry
    code], [bypass detector]); ``answer_ahead``: answer calls that run no graph in the entry
    (Note [answered ahead]); ``guards``: Dynamo's guards on every call that runs a graph, or
    on the first of each generation (Note [guards once per generation]; needs
    ``answer_ahead``). Idempotent for the same session; a second session is refused."""
    if on_bypass not in ON_BYPASS:
        raise ValueError(f"on_bypass must be one of {ON_BYPASS}, got {on_bypass!r}")
    if guards not in GUARDS:
        raise ValueError(f"guards must be one of {GUARDS}, got {guards!r}")
    existing = entry_of(model)
    if existing is not None:
        if existing.session is not session:
            raise RuntimeError("this model is already cached by another CacheSession; create one CacheSession per model")
        return existing
    forward = model.forward
    tag = f"mixcache#{next(_serial)}"
    if isinstance(forward, types.MethodType) and forward.__self__ is model and isinstance(forward.__func__, types.FunctionType):
        own: Callable[..., Any] = own_code_copy(forward.__func__, tag)
        bound = isolated = True
    elif isinstance(forward, types.FunctionType):  # an instance attribute
        own, bound, isolated = own_code_copy(forward, tag), False, True
    else:
        own, bound, isolated = forward, False, False
        warnings.warn(
            f"mixcache: {type(model).__name__}.forward is a {type(forward).__name__}, not a function; it keeps "
            "the code object it shares with other compiles, which can make Dynamo skip it. Calls that skip the "
            "session are still detected (stats()['bypassed_calls']).",
            RuntimeWarning,
            stacklevel=3,
        )
    entry = ModelEntry(session, on_bypass, own, bound, isolated, guards)
    if not answer_ahead:
        entry.shortcut = None
    model.__dict__[_ENTRY_ATTR] = entry
    model.forward = types.MethodType(_mixcache_entry, model)
    return entry
