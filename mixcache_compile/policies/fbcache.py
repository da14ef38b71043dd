"""Policies ``fbcache`` (First-Block Cache) and ``dbcache`` (Dual-Block Cache).

Every call runs a probe: the first ``Fn`` blocks are computed and the relative L1 change of
their hidden-stream residual against the stored one is measured inside the stage graph::

    r = h_Fn - h_0,   indicator = mean|r - r_prev| / mean|r_prev|

If ``indicator < threshold`` the call skips blocks ``[Fn, N - Bn)``, adding their cached
residual (per branch) to their input streams, and computes the last ``Bn`` blocks; otherwise
it computes everything (and records that residual). ``r_prev`` is replaced when the call
computes (``update="on_compute"``, diffusers' and ParaAttention's rule) or on every probe
(``update="always"``). The first probe of a branch reports +inf (computes).

Knobs: ``warmup`` (the first steps always compute; they still probe, so the first step after
warm-up has a previous residual), ``max_cached`` (at most that many consecutive skipped calls
per branch, then one computes; None = no limit).

``fbcache`` defaults: ``Fn=1, Bn=0, threshold=0.05, warmup=0``: diffusers'
``FirstBlockCacheConfig`` (it skips when the change is ``<= threshold``; ties have measure
zero). ``dbcache`` defaults ``Fn=8, Bn=8, threshold=0.08, warmup=8`` follow cache-dit's
DBCache "F8B8" configuration (**reconstruction**: cache-dit's defaults have changed between
versions). ``Fn``/``Bn`` must leave at least one block to skip on the model at hand, else
``needs`` raises naming the options. A range crossing two block chains (e.g. Flux's dual- and
single-stream blocks) cannot be skipped by the runtime: those calls compute and the
fallback is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .config import PolicyConfig, expect_config
from .base import PolicyBase
from .protocol import FULL, PROBE, Action, ActionKind, CacheNeeds, CallReport, ModelInfo, Observation, Probe
from .schedules import check_float, check_positive_int

_UPDATES = ("on_compute", "always")


@dataclass(frozen=True)
class FbCacheConfig(PolicyConfig):
    """Options of ``fbcache`` (defaults: diffusers' ``FirstBlockCacheConfig``)."""

    name: ClassVar[str] = "fbcache"
    threshold: float = 0.05  # skip when the probe's rel-L1 change is below this (>= 0)
    Fn: int = 1  # noqa: N815 -- blocks computed (and probed) first, >= 1
    Bn: int = 0  # noqa: N815 -- blocks always computed last, >= 0
    warmup: int = 0  # the first steps always compute (they still probe), >= 0
    update: str = "on_compute"  # replace the probe's previous value "on_compute" or "always"
    max_cached: int | None = None  # at most this many consecutive skips per branch (None: no limit)

    def __post_init__(self) -> None:
        self._set("threshold", check_float(self.threshold, "threshold", minimum=0.0))
        check_positive_int(self.Fn, "Fn", minimum=1)
        check_positive_int(self.Bn, "Bn", minimum=0)
        check_positive_int(self.warmup, "warmup", minimum=0)
        if self.update not in _UPDATES:
            raise ValueError(f"update must be one of {_UPDATES}, got {self.update!r}")
        if self.max_cached is not None:
            check_positive_int(self.max_cached, "max_cached")


@dataclass(frozen=True)
class DbCacheConfig(FbCacheConfig):
    """Options of ``dbcache``: as ``fbcache`` with cache-dit's DBCache "F8B8" defaults."""

    name: ClassVar[str] = "dbcache"
    threshold: float = 0.08
    Fn: int = 8  # noqa: N815
    Bn: int = 8  # noqa: N815
    warmup: int = 8


class FBCachePolicy(PolicyBase):
    name = "fbcache"

    def __init__(self, config: FbCacheConfig | None = None) -> None:
        self.config = config = expect_config(config, FbCacheConfig)
        self.threshold = config.threshold
        self.Fn = config.Fn
        self.Bn = config.Bn
        self.warmup = config.warmup
        self.update = config.update
        self.max_cached = config.max_cached
        self.skip_range: tuple[int, int] | None = None
        self.reset()

    def reset(self) -> None:
        self._run: dict[str, int] = {}  # branch -> consecutive skipped calls

    def needs(self, model: ModelInfo) -> CacheNeeds:
        stop = model.num_blocks - self.Bn
        if self.Fn >= stop:
            raise ValueError(
                f"{self.name}: Fn={self.Fn} and Bn={self.Bn} leave no block to skip in a "
                f"{model.num_blocks}-block model; lower Fn or Bn"
            )
        self.skip_range = (self.Fn, stop)
        return CacheNeeds(ranges={self.skip_range}, probe=Probe("blocks", blocks=self.Fn, update=self.update))

    def decide(self, obs: Observation) -> Action:
        return PROBE

    def after_probe(self, obs: Observation, indicator: float) -> Action:
        if obs.step < self.warmup or not self.skips(indicator):
            return FULL
        if self.max_cached is not None and self._run.get(obs.branch, 0) >= self.max_cached:
            return FULL
        return Action(ActionKind.BLOCK, block_range=self.skip_range)

    def skips(self, indicator: float) -> bool:
        """Whether a probe value allows skipping: ``indicator < threshold`` (finite)."""
        return math.isfinite(indicator) and indicator < self.threshold

    def observe(self, report: CallReport) -> None:
        skipped = report.action.kind is ActionKind.BLOCK
        self._run[report.branch] = self._run.get(report.branch, 0) + 1 if skipped else 0


class DBCachePolicy(FBCachePolicy):
    name = "dbcache"

    def __init__(self, config: DbCacheConfig | None = None) -> None:
        super().__init__(expect_config(config, DbCacheConfig))
