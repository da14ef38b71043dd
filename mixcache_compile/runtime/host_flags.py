"""Finiteness flags of cached tensors, computed when they are stored and read without a sync.

Note [finite flags off the per-call path]: ``check_finite`` must not read every reused tensor
on the host at each call (issue #10, item 4). Instead, when a call stores tensors in the
cache, one "all finite" flag for them is computed on their device (a reduction queued behind
the stage that made them), reduced over ranks (Note [rank-consistent decisions]), and copied
to the host with ``non_blocking=True`` into pinned memory, with an event recorded after the
copy. A later call that would reuse them reads that host copy: on an accelerator it waits at
most for that earlier event (normally long done: a whole call ran since), never for the
current call's work; on the CPU the flag already is host memory. So a call whose action is
known in advance (a static schedule) makes no device-to-host transfer, and a probe call
makes exactly one (its indicator).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .distributed import reduce_sum

# Set on every host copy this module makes; tests that count device reads skip these.
HOST_COPY_ATTR = "_mixcache_host_copy"


class FiniteFlag:
    """``all(isfinite(t).all() for t in tensors)`` over all ranks, on its way to the host."""

    __slots__ = ("_host", "_event")

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        bad = torch.stack([(~torch.isfinite(t)).any() for t in tensors]).sum()
        bad = reduce_sum(bad)  # a device-side collective: every rank stores the same keys at the same call
        self._event = None
        if bad.device.type == "cpu":
            self._host = bad
        else:
            self._host = torch.empty((), dtype=bad.dtype, pin_memory=True)
            self._host.copy_(bad, non_blocking=True)
            if bad.device.type == "cuda":
                self._event = torch.cuda.Event()
                self._event.record()
        setattr(self._host, HOST_COPY_ATTR, True)

    def all_finite(self) -> bool:
        if self._event is not None:
            self._event.synchronize()  # the copy queued when the tensors were stored
        return int(self._host) == 0
