"""Ways an export directory gets damaged, for the integrity tests: a flipped byte, a zeroed
block, a truncated or missing file, a manifest rewritten (and re-signed) by other versions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from mixcache_compile.export.integrity import manifest_digest


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: Path, offset: int | None = None) -> int:
    """XOR one byte (the middle one by default) with 0x01; returns the offset."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return offset


def zero_block(path: Path, size: int = 1024) -> None:
    """Overwrite ``size`` bytes in the middle with zeros (what a bad sector or a hole looks like)."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - size // 2)
    data[start:start + size] = bytes(min(size, len(data) - start))
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def rewrite_manifest(directory: Path, change: Callable[[dict], None], resign: bool = True) -> None:
    """Apply ``change`` to the raw manifest; ``resign`` recomputes its own digest, as a
    manifest written that way by the exporter would have."""
    path = directory / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    if resign:
        raw["integrity"]["manifest"] = manifest_digest(raw)
    path.write_text(json.dumps(raw, indent=1))
