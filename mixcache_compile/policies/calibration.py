"""Calibration files of ``mixcache``: what the policy reads at run time.

Two files: the sensitivities ``I(g)`` for g in (step, cfg, block) (``load``; written by
``save`` from the measuring tool ``eval/calibrate.py``, ``mixcache calibrate``, whose docstring
explains the measurement), and the error-budget calibration (``load_budget``; written by
``eval/budget_fit.py``, ``mixcache calibrate --target-psnr``). ``MixCacheConfig(calibration=path)``
reads them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


GRANULARITIES = ("step", "cfg", "block")
MODES = ("gaussian", "reuse")
FORMAT_VERSION = 1


# ---- files ------------------------------------------------------------------------------------
def save(result: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")


def load(path: str | os.PathLike[str]) -> dict[str, float]:
    """The sensitivities of a calibration file (a full result, or a plain {g: value} map)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration file {os.fspath(path)!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration file {os.fspath(path)!r} is not JSON: {err}") from None
    values = data.get("sensitivities", data) if isinstance(data, dict) else None
    if not isinstance(values, dict) or not values or not all(isinstance(v, (int, float)) for v in values.values()):
        raise ValueError(f"calibration file {os.fspath(path)!r} has no 'sensitivities' mapping of numbers")
    return {str(k): float(v) for k, v in values.items()}


BUDGET_FORMAT = 2


def load_budget(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The error-budget calibration of ``mixcache`` (``eval/budget_fit.py`` writes it): ``k``
    (coefficient per ``budget.COEFFICIENTS``), ``savings`` (``block``, ``attn`` in [0, 1]),
    ``rescale`` (indicator polynomial, highest degree first) and ``threshold``."""
    from .budget import COEFFICIENTS

    name = os.fspath(path)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration file {name!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration file {name!r} is not JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != BUDGET_FORMAT:
        raise ValueError(f"calibration file {name!r} is not a mixcache budget calibration (format {BUDGET_FORMAT}); "
                         "write one with `mixcache calibrate --target-psnr X --out FILE`")

    def number(value: Any, what: str, low: float = 0.0, high: float = math.inf) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"calibration file {name!r}: {what} must be a number in [{low}, {high}], got {value!r}")
        return float(value)

    k, savings, rescale = data.get("k"), data.get("savings"), data.get("rescale")
    if not isinstance(k, dict) or set(k) != set(COEFFICIENTS):
        raise ValueError(f"calibration file {name!r}: 'k' must map exactly {COEFFICIENTS} to numbers, got {k!r}")
    if not isinstance(savings, dict) or set(savings) != {"block", "attn"}:
        raise ValueError(f"calibration file {name!r}: 'savings' must map 'block' and 'attn' to fractions, got {savings!r}")
    if not isinstance(rescale, list) or not rescale:
        raise ValueError(f"calibration file {name!r}: 'rescale' must be a non-empty list of numbers, got {rescale!r}")
    return {
        **data,
        "k": {q: number(v, f"k[{q!r}]") for q, v in k.items()},
        "savings": {q: number(v, f"savings[{q!r}]", 0.0, 1.0) for q, v in savings.items()},
        "rescale": [number(c, "rescale[]", -math.inf) for c in rescale],
        "threshold": number(data.get("threshold"), "threshold"),
    }
