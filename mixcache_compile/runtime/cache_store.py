"""Owned cache buffers.

Note [owned buffers]: a cached tensor is never a reference to a stage output. Engines may
reuse output storage on the next run (CUDA graph trees overwrite earlier replays), and the
caller may modify what it was returned, so every cached value is copied with ``copy_`` into a
buffer allocated once per key and shape, and freed on ``clear``.

Note [buffers in every autograd mode]: a buffer is a normal tensor (never an inference
tensor) that never takes part in autograd. It is allocated outside inference mode and
written under ``no_grad`` from a detached value. So the same buffer can be written and read
under ``torch.inference_mode()``, ``torch.no_grad()`` and with grad enabled, and a session
may switch modes between (or within) generations: an inference tensor could not be updated
in place outside inference mode, and a buffer written with grad enabled would otherwise keep
the caller's whole autograd graph alive. Reused values are constants to autograd (caching
is for inference; a reused call has no gradient path to the model's parameters).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch


class CacheStore:
    def __init__(self) -> None:
        self._buffers: dict[Hashable, torch.Tensor] = {}
        self._valid: set[Hashable] = set()
        self.allocations = 0
        self.peak_bytes = 0

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != value.device:
            with torch.inference_mode(False):  # Note [buffers in every autograd mode]
                buf = torch.empty(value.shape, dtype=value.dtype, device=value.device)
            self._buffers[key] = buf
            self.allocations += 1
            self.peak_bytes = max(self.peak_bytes, self.nbytes())
        with torch.no_grad():
            buf.copy_(value.detach())
        self._valid.add(key)

    def get(self, key: Hashable) -> torch.Tensor | None:
        return self._buffers[key] if key in self._valid else None

    def has(self, key: Hashable) -> bool:
        return key in self._valid

    def rotate(self, current: Hashable, previous: Hashable) -> None:
        """Make ``current`` the ``previous`` value without copying (buffers swap roles), so
        the next ``put(current, ...)`` writes into the old previous buffer."""
        cur_buf, prev_buf = self._buffers.pop(current, None), self._buffers.pop(previous, None)
        cur_ok, prev_ok = current in self._valid, previous in self._valid
        self._valid.discard(current)
        self._valid.discard(previous)
        if cur_buf is not None:
            self._buffers[previous] = cur_buf
            if cur_ok:
                self._valid.add(previous)
        if prev_buf is not None:
            self._buffers[current] = prev_buf

    def invalidate(self, key: Hashable) -> None:
        self._valid.discard(key)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (a new generation or a shape change: nothing may be reused)."""
        self._buffers.clear()
        self._valid.clear()
