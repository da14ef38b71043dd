"""Small pieces every command-line entry shares, written once.

* ``parse_key_values``: ``KEY=VALUE`` policy options (``mixcache demo -o every=2``,
  ``mixcache export -o threshold=0.1``), each value JSON if it parses, else the string;
* ``load_model_spec``: the ``MODEL`` argument, ``zoo`` (the shipped tiny text-to-video
  pipeline) or ``module:function`` returning ``(model_or_pipeline, call_kwargs)``;
* ``write_or_print``: a JSON result written to ``--out`` (with a one-line note) or printed.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "red circle moving left"


class ModelSpecError(ValueError):
    """A ``MODEL`` argument that names nothing loadable; the message says why."""


def parse_key_values(pairs: Sequence[str], what: str = "policy option") -> dict[str, Any]:
    """``["every=2", "name=fast"]`` -> ``{"every": 2, "name": "fast"}``; ValueError names a bad pair."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"{what} {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def load_model_spec(
    spec: str, steps: int, *, prompt: str = DEFAULT_PROMPT, disable_progress_bar: bool | None = True
) -> tuple[Any, dict[str, Any]]:
    """``(model_or_pipeline, call_kwargs)`` for a ``MODEL`` argument.

    ``zoo``: the shipped pipeline (its own progress bar set by ``disable_progress_bar``; None
    leaves tqdm to decide) called with ``prompt`` and ``steps`` denoising steps. ``module:function``:
    whatever the function returns, checked to be a pair (the steps are the caller's business).
    """
    from .zoo import MODELS

    if spec == "zoo" or spec in MODELS:  # "zoo": the default shipped model; or one by name (tiny, deep)
        from .zoo import default_call_kwargs, load_pipeline

        pipe = load_pipeline() if spec == "zoo" else load_pipeline(name=spec)
        pipe.set_progress_bar_config(disable=disable_progress_bar)
        return pipe, {"prompt": prompt, **default_call_kwargs(num_inference_steps=steps)}
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ModelSpecError(f"model spec {spec!r} is neither 'zoo' nor 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ModelSpecError(f"cannot load {spec!r}: {err}") from None
    result = fn()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise ModelSpecError(f"{spec} must return (model_or_pipeline, example_call_kwargs)")
    return result


def write_or_print(result: Mapping[str, Any], out: str | None, note: Callable[[Mapping[str, Any]], str],
                   save: Callable[[Mapping[str, Any], str], None] | None = None) -> None:
    """Write ``result`` as JSON to ``out`` and print ``wrote OUT: note(result)``; without ``out``
    print the JSON itself (sorted keys, indent 2)."""
    if out:
        (save or _save_json)(result, out)
        print(f"wrote {out}: {note(result)}")
    else:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        print()


def _save_json(result: Mapping[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
