"""Versions an export was made with, and whether the running ones may load it.

Note [version policy]: a saved inductor artifact is compiled code (pickled FX-graph and
AOT-autograd cache entries, generated C++ and built kernels) tied to the torch build, the
Python version and this package's runtime that made it; torch itself only asserts on a hash
of its source, with no message. So for ``format == "inductor"`` a mismatch of torch, Python
(major.minor) or mixcache-compile is refused, naming each difference. An ONNX directory is
data (graphs in a versioned opset and raw tensors) that a newer onnxruntime reads, so there a
mismatch of torch, onnx, onnxruntime or mixcache-compile is a warning. The manifest format
version is checked by ``Manifest.load`` for both (a different one is refused).
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import warnings
from typing import Any

from .onnx_export import ExportError

DISTRIBUTIONS = ("torch", "mixcache-compile", "diffusers", "onnx", "onnxscript", "onnxruntime")
# what must match to load (refused) or should match (warned), per export format
STRICT = {"inductor": ("torch", "python", "mixcache-compile")}
WARN = {"onnx": ("torch", "onnx", "onnxruntime", "mixcache-compile")}


class ExportVersionError(ExportError):
    """The export was made with versions this process cannot load it with; the message lists them."""


class ExportVersionWarning(UserWarning):
    """The export was made with other versions of libraries that do not have to match."""


def running_versions() -> dict[str, str]:
    """Versions of the distributions that make or read exports, plus Python's major.minor."""
    out = {"python": ".".join(platform.python_version_tuple()[:2])}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _differences(recorded: dict[str, Any], running: dict[str, str], names: tuple[str, ...], strict: bool) -> list[str]:
    out = []
    for name in names:
        made, now = recorded.get(name), running.get(name)
        if made == now:
            continue
        if made is None and not strict:
            continue  # not recorded (or not installed at export): nothing to compare for a warning
        out.append(f"{name} {made or 'not recorded'} (export) vs {now or 'not installed'} (running)")
    return out


def check_versions(format: str, recorded: dict[str, Any], where: str, running: dict[str, str] | None = None) -> None:
    """Refuse (inductor) or warn (ONNX) when ``recorded`` (the manifest's ``created_with``)
    differs from the running versions, Note [version policy]."""
    running = running if running is not None else running_versions()
    strict = _differences(recorded, running, STRICT.get(format, ()), strict=True)
    if strict:
        raise ExportVersionError(
            f"{where} holds saved inductor artifacts made with other versions: {'; '.join(strict)}. Inductor artifacts "
            "are compiled code tied to the torch build and Python that made them: export again in this environment")
    loose = _differences(recorded, running, WARN.get(format, ()), strict=False)
    if loose:
        warnings.warn(f"{where} was exported with other versions: {'; '.join(loose)}. ONNX files are data and "
                      "normally load with newer versions, but this export was checked against the eager model "
                      "only with the versions it records", ExportVersionWarning, stacklevel=3)
