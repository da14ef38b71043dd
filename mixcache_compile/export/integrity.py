"""Integrity of an export directory: the SHA-256 and size of every file the manifest names.

``record_files`` runs at export (on the finished files, in the staging directory);
``verify_files`` runs when an export is loaded and refuses, naming the file and what differs,
a file that is missing, of another size, or of other content. ``manifest_digest`` is the
manifest's own digest (over its canonical JSON, so whitespace does not count; a changed value
does).

This guards against accidents (a bad disk, an interrupted copy, a truncated download), not
against an attacker: whoever can rewrite a file can rewrite the manifest too. Saved inductor
artifacts execute code when loaded; see docs/export.md ("Trust").
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

ALGORITHM = "sha256"
_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A file of an export is missing, truncated or changed; the message names it and says how."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_relative(rel: str) -> PurePosixPath:
    """``rel`` as a path inside the export directory; anything that could leave it is refused."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise IntegrityError(f"the manifest names {rel!r}, which is not a plain path inside the export directory")
    return p


def record_files(directory: Path, rels: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{rel: {"sha256": hex, "bytes": n}}`` for each file, sorted by path."""
    out = {}
    for rel in sorted(set(rels)):
        path = Path(directory) / check_relative(rel)
        out[rel] = {ALGORITHM: sha256_of(path), "bytes": path.stat().st_size}
    return out


# Note [verified once per process]: hashing a large export on every load would make repeated
# loads (a server building one transformer per pipeline, a notebook re-running a cell) pay for
# reading every byte again. A file whose digest matched is remembered by its stat:
# device, inode, size, mtime and ctime. Any write to the file changes its ctime (which,
# unlike mtime, no user call can set back), and a replacing file has a new ctime, so a file
# changed after it was verified is hashed again. The memo lives in this process only. (A
# write within the filesystem's timestamp granularity, a few ms, of the verification that keeps
# the size could go unnoticed by this process; a new process always hashes.)
_VERIFIED: set[tuple] = set()
_LOCK = threading.Lock()


def _identity(st: os.stat_result, expected: str) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, expected)


def verify_files(directory: Path, files: Mapping[str, Mapping[str, Any]]) -> int:
    """Check every file against its record; returns how many were hashed (0 when all were
    verified before in this process, Note [verified once per process]). Raises
    ``IntegrityError`` at the first file that is missing, of another size or of other content."""
    directory = Path(directory)
    hashed = 0
    for rel, record in files.items():
        path = directory / check_relative(rel)
        expected, size = record.get(ALGORITHM), record.get("bytes")
        if not isinstance(expected, str) or not isinstance(size, int):
            raise IntegrityError(f"the manifest's record of {rel} has no {ALGORITHM} and size: {dict(record)!r}")
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing; the manifest names it ({size} bytes). The export is incomplete: "
                                 "copy the whole directory again or export again") from None
        if not path.is_file():
            raise IntegrityError(f"{path} is not a regular file; the manifest names a {size}-byte file there")
        if st.st_size != size:
            raise IntegrityError(f"{path} is {st.st_size} bytes; the manifest records {size} bytes "
                                 f"({'truncated' if st.st_size < size else 'grown'}: an interrupted copy or download?). "
                                 "Copy or export again")
        key = _identity(st, expected)
        with _LOCK:
            if key in _VERIFIED:
                continue
        actual = sha256_of(path)
        hashed += 1
        if actual != expected:
            raise IntegrityError(f"{path} has SHA-256 {actual[:16]}..., the manifest records {expected[:16]}... "
                                 f"(same size, {size} bytes): the file is corrupted or was changed after export. "
                                 "Copy or export again")
        with _LOCK:
            _VERIFIED.add(key)
    return hashed


def forget_verified() -> None:
    """Drop the per-process memo (tests; or to force hashing again)."""
    with _LOCK:
        _VERIFIED.clear()


def manifest_digest(body: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without its ``integrity`` entry."""
    canonical = json.dumps({k: v for k, v in body.items() if k != "integrity"}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
