"""``TraceLog``: the session's decision trace, bounded so that a long-lived server does not leak.

Note [bounded trace]: the trace keeps the newest ``limit`` entries and drops the oldest
(``dropped`` counts them). Nothing else reads it back: ``stats()`` comes from counters
updated on every call, so it stays exact however many entries were dropped. Indexing and
slicing address the entries still held (index 0 is the oldest kept).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Generic, TypeVar, overload

DEFAULT_TRACE_LIMIT = 10_000

T = TypeVar("T")


def check_trace_limit(limit: object) -> int | None:
    """``limit`` as a valid bound: a positive int, or None for no bound (debugging only)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"trace_limit must be a positive int (or None for no bound), got {limit!r}")
    return limit


class TraceLog(Sequence[T], Generic[T]):
    def __init__(self, limit: int | None = DEFAULT_TRACE_LIMIT) -> None:
        self._entries: deque[T] = deque(maxlen=check_trace_limit(limit))
        self.dropped = 0

    @property
    def limit(self) -> int | None:
        return self._entries.maxlen

    def append(self, entry: T) -> None:
        if self._entries.maxlen is not None and len(self._entries) == self._entries.maxlen:
            self.dropped += 1
        self._entries.append(entry)

    def clear(self) -> None:
        self._entries.clear()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries)

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self._entries))
            if step == 1:
                return list(islice(self._entries, start, max(start, stop)))
            return list(self._entries)[index]
        return self._entries[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TraceLog):
            return list(self._entries) == list(other._entries)
        if isinstance(other, list):
            return list(self._entries) == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"TraceLog({len(self._entries)} entries, limit={self.limit}, dropped={self.dropped})"
