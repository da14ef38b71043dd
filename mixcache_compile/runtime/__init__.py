"""The runtime state machine: a session per denoising run, a stage runner per planned graph."""

from .session import CacheSession, TraceEntry

__all__ = ["CacheSession", "TraceEntry"]
