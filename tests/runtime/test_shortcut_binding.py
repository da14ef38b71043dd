"""The entry's argument binding (``Shortcut.locals_of``, a plan per call shape) gives what
``inspect.Signature.bind`` + ``apply_defaults`` give: the frame locals Dynamo's sources name."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from mixcache_compile.runtime.shortcut import Shortcut


def _mixed(self, a, b=2, *args, c, d=4, **kw): ...  # noqa: ANN001, ANN202, ANN003, ANN002 - every kind of parameter


def _wrapper(self, *args, **kwargs): ...  # noqa: ANN001, ANN202, ANN003, ANN002 - diffusers' decorator wrapper


def _wan(self, hidden_states, timestep, encoder_hidden_states=None, return_dict=True, attention_kwargs=None): ...  # noqa: ANN001, ANN202


CALLS = [
    (_mixed, (0, 1), {"c": 3}),
    (_mixed, (0, 1, 5, 6, 7), {"c": 3, "z": 9, "d": 1}),
    (_mixed, (0,), {"a": 1, "c": 2}),
    (_wrapper, (0,), {"x": 1, "y": 2}),
    (_wrapper, (0, 1, 2), {}),
    (_wan, (0,), {"hidden_states": 1, "timestep": 2, "return_dict": False}),
    (_wan, (0, 1, 2, 3), {}),
]


@pytest.mark.parametrize(("func", "args", "kwargs"), CALLS)
def test_locals_equal_inspect_bind(func: Any, args: tuple, kwargs: dict) -> None:
    shortcut = Shortcut(func, bound=True)
    reference = inspect.signature(func).bind(*args, **kwargs)
    reference.apply_defaults()
    for _ in range(2):  # the plan is made by the first call and reused by the second
        assert shortcut.locals_of(args, kwargs) == dict(reference.arguments)
    # a fresh **kwargs dict per call: what one call's frame holds is not another's
    if "kw" in reference.arguments or "kwargs" in reference.arguments:
        name = "kw" if "kw" in reference.arguments else "kwargs"
        assert shortcut.locals_of(args, kwargs)[name] is not shortcut.locals_of(args, kwargs)[name]


def test_a_call_the_signature_refuses_raises_as_bind_does() -> None:
    with pytest.raises(TypeError, match="hidden_states"):
        Shortcut(_wan, bound=True).locals_of((0,), {"nope": 1})
