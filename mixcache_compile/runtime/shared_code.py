"""Releasing the backend form's first compile from the code object a model class shares.

Note [first call on the shared code]: ``torch.compile(model, backend="mixcache")`` cannot give
the model its own entry code before Dynamo first traces it (nothing of ours runs before that
call), so the model's first call is compiled on the code object every instance of the class
shares (``type(model).forward``, or diffusers' decorator ``wrapper``), and only then does the
backend install the model's own entry (Note [own entry code] in entry.py). That first cache
entry is never looked up again, but Dynamo counts it: cache entries with different backends
on one code object all count against ``torch._dynamo.config.recompile_limit`` (8), dead
models' entries included. So, without release, the ninth model compiled this way in a
process failed its first call under ``fullgraph=True``, and without ``fullgraph`` ran
uncached with no entry to detect it.

Release: at the model's next call under Dynamo, if every cache entry on the shared code
belongs to a mixcache backend whose model already enters through its own code, the shared
code's Dynamo state is reset (``reset_code``): nothing live uses those entries. If any other
compile has entries there (a plain ``torch.compile`` of another instance), nothing is
touched; ``mixcache_compile.enable()``, which installs the entry before compiling, or
``torch.compile(..., isolate_recompiles=True)`` avoid the shared code altogether.
"""

from __future__ import annotations

import logging
import types
import weakref
from typing import Any

from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code

log = logging.getLogger(__name__)

# Sessions whose model was traced on a shared code object and now enters through its own
# (their entries on the shared code are dead weight). Weak: a cache entry's backend holds its
# session, so a session in here is alive as long as any entry that names it.
_MOVED_ON: weakref.WeakSet[Any] = weakref.WeakSet()


def note_moved_on(session: Any) -> None:
    _MOVED_ON.add(session)


def _is_moved_on_mixcache(backend: Any) -> bool:
    if getattr(backend, "compiler_name", None) != "mixcache":
        return False
    options = (getattr(backend, "kwargs", None) or {}).get("options") or {}
    session = options.get("session") if isinstance(options, dict) else None
    return session is not None and session in _MOVED_ON


def release_shared_code(code: types.CodeType) -> bool:
    """Reset ``code``'s Dynamo cache if only moved-on mixcache compiles hold entries there;
    True if released (or nothing to release). Call with Dynamo's frame callback off and no
    frame of ``code`` running."""
    entries = _debug_get_cache_entry_list(code)
    if not entries:
        return True
    if not all(_is_moved_on_mixcache(e.backend) for e in entries):
        log.info("mixcache: %s has cache entries of other compiles; left as it is", code.co_qualname)
        return False
    reset_code(code)
    return True
