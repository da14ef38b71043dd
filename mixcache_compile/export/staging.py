"""Atomic export: write into a staging directory beside the target, then move it into place.

Note [atomic export]: an export is written into ``.<name>.staging-<random>`` in the target's
parent directory (the same filesystem, so a rename moves it). Only when every file and the
manifest are written does ``publish`` put it at the target: a fresh target is one
``rename``; an existing export is swapped with the new one in one ``renameat2(RENAME_EXCHANGE)``
call where Linux offers it (then the old one, now at the staging path, is deleted), else moved
aside, replaced, and deleted (a crash between those two renames leaves the target absent, the
old export in ``.<name>.old-*``: never a half-written directory). A failure while writing
deletes the staging directory and leaves the target as it was. A process killed while writing
leaves the staging directory behind (hidden, never loaded); delete it by hand.

The target may be absent, an empty directory, or an earlier export (a directory with a
``manifest.json``); anything else is refused, so a typo cannot delete a directory of other files.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from .onnx_export import ExportError

MANIFEST_NAME = "manifest.json"  # as manifest.MANIFEST_NAME (not imported: this module has one job)


def check_target(out: Path) -> None:
    """Refuse a target that is a file or a non-empty directory that is not an export."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"cannot export to {out}: it exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ExportError(f"refusing to export into {out}: it is not empty and holds no {MANIFEST_NAME}, so it is not an "
                          "earlier export that may be replaced; choose an empty or new directory")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh staging directory beside ``out``; removed if the body raises, published to
    ``out`` (Note [atomic export]) if it returns."""
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(out.parent, f".{out.name}.staging-")
    try:
        yield tmp
        check_target(out)  # it may have changed while we wrote
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, out: Path) -> None:
    """Put the finished directory ``tmp`` at ``out``, replacing an earlier export whole."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        os.rename(tmp, out)  # rename(2) replaces an empty directory
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old export
        return
    old = _fresh_dir(out.parent, f".{out.name}.old-")
    os.rename(out, old / "export")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "export", out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new directory ``parent/prefix<random>`` made with ``mkdir``, so it gets the umask's
    permissions as a plain ``mkdir`` of the target would (``tempfile.mkdtemp`` makes it 0700,
    which after the rename would hide the export from other users)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where
    the call or the flag is not available (then the caller renames in two steps)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0
