"""Progress bars of the long-running commands (calibrate, bench, export, demo).

Note [quiet progress]: a bar is shown only on an interactive stderr and never under
``--quiet``: ``tqdm(disable=None)`` turns itself off when stderr is not a terminal, which is
the case under pytest (output captured), in CI logs and when piping, so tests and scripts stay
quiet without a flag; ``set_quiet(True)`` (every command's ``--quiet``) turns bars off everywhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar off (True) or back to the terminal rule (False)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def progress(iterable: Iterable[Any] | None = None, desc: str = "", total: int | None = None, unit: str = "it") -> Any:
    """A tqdm bar on stderr (see Note [quiet progress]); use like ``tqdm`` (``update``, ``close``,
    ``set_postfix_str`` work when it is off too)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=True, dynamic_ncols=True, file=sys.stderr,
                disable=True if _quiet else None)


def add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars (they are off anyway when stderr is not a terminal)")
