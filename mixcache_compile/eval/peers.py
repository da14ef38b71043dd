"""Peer caching methods, switched on the way their own users switch them on.

Each ``Peer`` turns one method with one knob setting on a diffusers pipeline, resets its
state between generations and turns it off again:

* diffusers' built-in hooks: ``pipe.transformer.enable_cache(Config)``, reset with
  ``pipe.transformer._reset_stateful_cache()``, removed with ``pipe.transformer.disable_cache()``
  (FirstBlockCache, TaylorSeer, MagCache, Pyramid Attention Broadcast, FasterCache);
* cache-dit's DBCache: ``cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(...))``,
  removed with ``cache_dit.disable_cache(pipe)`` (the ``bench`` extra: ``pip install -e '.[bench]'``).

``compiled=True`` applies ``torch.compile`` to the transformer after the cache is switched on
(the order the diffusers and cache-dit docs give): hooks are installed on the eager modules
and Dynamo traces through them, breaking the graph where a hook is compile-disabled.

MagCache needs per-model magnitude ratios: ``enable`` first runs the documented calibration
(``MagCacheConfig(calibrate=True)``, one uncached generation, the printed ratios read back)
through the ``calibrate`` callable it is given, then switches the calibrated cache on.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# cache-dit logs every context and statistic at INFO level; the benchmark's output is the table.
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")

# TaylorSeer's default module patterns ("^blocks.*attn" under re.fullmatch) match Flux-style
# names ("transformer_blocks.0.attn") but no Wan module ("blocks.0.attn1"): on Wan the default
# config hooks nothing. These patterns name Wan's self-attention, cross-attention and FFN
# outputs, the features the TaylorSeer paper forecasts.
WAN_TAYLORSEER_IDENTIFIERS = (r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn")


@dataclass
class PeerContext:
    """What an adapter may need from the benchmark: the step count of the generations it will
    run and a function running one uncached-shape generation on the pipeline (calibration)."""

    steps: int
    run_once: Callable[[Any], Any] | None = None
    notes: list[str] = field(default_factory=list)
    memo: dict[Any, Any] = field(default_factory=dict)  # per-workload results shared by adapters (calibrations)


class Peer:
    """One peer method at one knob setting. Subclasses implement ``_enable``/``disable``/``reset``."""

    key: str = ""  # method name, e.g. "fbcache"
    library: str = ""  # "diffusers" or "cache-dit"
    title: str = ""  # human name, e.g. "FirstBlockCache"

    def __init__(self, **knobs: Any) -> None:
        self.knobs = knobs

    @property
    def name(self) -> str:
        return f"{self.library}:{self.key}"

    id_knobs: tuple[str, ...] = ()  # the knobs that name the configuration in a method id

    @property
    def id(self) -> str:
        """``library:key(knob=value)``: what distinguishes this setting in a sweep."""
        shown = ", ".join(f"{k}={_fmt(self.knobs[k])}" for k in self.id_knobs if k in self.knobs)
        return f"{self.name}({shown})" if shown else self.name

    @property
    def knob_text(self) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.knobs.items())

    def available(self) -> str | None:
        """None when the method can run here, else why not."""
        return None

    def enable(self, pipe: Any, ctx: PeerContext, compiled: bool = False) -> None:
        self._enable(pipe, ctx)
        if compiled:
            pipe.transformer = torch.compile(pipe.transformer)

    def _enable(self, pipe: Any, ctx: PeerContext) -> None:
        raise NotImplementedError

    def reset(self, pipe: Any) -> None:
        """Forget the state of the previous generation."""

    def disable(self, pipe: Any) -> None:
        raise NotImplementedError


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_fmt(v) for v in value) + ")"
    return str(value)


def _uncompiled(pipe: Any) -> torch.nn.Module:
    """The eager transformer, also when ``pipe.transformer`` is a ``torch.compile`` wrapper
    (whose own hooks were installed on the module it wraps)."""
    model = pipe.transformer
    return getattr(model, "_orig_mod", model)


# ---- diffusers hooks ----------------------------------------------------------------------
class DiffusersPeer(Peer):
    library = "diffusers"

    def config(self, pipe: Any, ctx: PeerContext) -> Any:
        raise NotImplementedError

    def _enable(self, pipe: Any, ctx: PeerContext) -> None:
        _uncompiled(pipe).enable_cache(self.config(pipe, ctx))

    def reset(self, pipe: Any) -> None:
        _uncompiled(pipe)._reset_stateful_cache()

    def disable(self, pipe: Any) -> None:
        model = _uncompiled(pipe)
        model.disable_cache()
        pipe.transformer = model


class FirstBlockCachePeer(DiffusersPeer):
    key, title = "fbcache", "FirstBlockCache"
    id_knobs = ("threshold",)

    def __init__(self, threshold: float = 0.05) -> None:
        super().__init__(threshold=threshold)

    def config(self, pipe: Any, ctx: PeerContext) -> Any:
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.knobs["threshold"])


class TaylorSeerPeer(DiffusersPeer):
    key, title = "taylorseer", "TaylorSeer"
    id_knobs = ("cache_interval",)

    def __init__(self, cache_interval: int = 5, disable_cache_before_step: int = 3, max_order: int = 1) -> None:
        super().__init__(cache_interval=cache_interval, disable_cache_before_step=disable_cache_before_step, max_order=max_order)

    def config(self, pipe: Any, ctx: PeerContext) -> Any:
        from diffusers import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            **self.knobs,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=list(WAN_TAYLORSEER_IDENTIFIERS),
        )


class PyramidAttentionBroadcastPeer(DiffusersPeer):
    key, title = "pab", "Pyramid Attention Broadcast"
    id_knobs = ("spatial_attention_block_skip_range",)

    def __init__(self, spatial_attention_block_skip_range: int = 2, spatial_attention_timestep_skip_range: tuple[int, int] = (100, 800)) -> None:
        super().__init__(
            spatial_attention_block_skip_range=spatial_attention_block_skip_range,
            spatial_attention_timestep_skip_range=tuple(spatial_attention_timestep_skip_range),
        )

    def config(self, pipe: Any, ctx: PeerContext) -> Any:
        from diffusers import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(**self.knobs, current_timestep_callback=lambda: pipe.current_timestep)


class FasterCachePeer(DiffusersPeer):
    """The diffusers docs' FasterCache example. Its unconditional-branch skip assumes a batch
    holding both CFG halves; Wan's separate cond/uncond calls make it index a missing half."""

    key, title = "fastercache", "FasterCache"

    def __init__(self, spatial_attention_block_skip_range: int = 2, unconditional_batch_skip_range: int = 5) -> None:
        super().__init__(
            spatial_attention_block_skip_range=spatial_attention_block_skip_range,
            unconditional_batch_skip_range=unconditional_batch_skip_range,
        )

    def config(self, pipe: Any, ctx: PeerContext) -> Any:
        from diffusers import FasterCacheConfig

        return FasterCacheConfig(
            **self.knobs,
            spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=lambda: pipe.current_timestep,
            attention_weight_callback=lambda _: 0.3,
            unconditional_batch_timestep_skip_range=(-1, 781),
            tensor_format="BCFHW",
        )


class MagCachePeer(DiffusersPeer):
    key, title = "magcache", "MagCache"
    id_knobs = ("threshold",)

    def __init__(self, threshold: float = 0.06, max_skip_steps: int = 3, retention_ratio: float = 0.2) -> None:
        super().__init__(threshold=threshold, max_skip_steps=max_skip_steps, retention_ratio=retention_ratio)

    def config(self, pipe: Any, ctx: PeerContext) -> Any:
        from diffusers import MagCacheConfig

        key = ("magcache_ratios", ctx.steps)
        if key not in ctx.memo:  # one calibration per model and step count, shared by all thresholds
            ctx.memo[key] = self.calibrate(pipe, ctx)
        return MagCacheConfig(**self.knobs, num_inference_steps=ctx.steps, mag_ratios=list(ctx.memo[key]))

    def calibrate(self, pipe: Any, ctx: PeerContext) -> list[float]:
        """The documented calibration: ``MagCacheConfig(calibrate=True)``, one generation, read
        the ratios it prints. With separate CFG calls it prints one list per branch; the
        config takes one list, so the element-wise mean of the printed lists is used."""
        from diffusers import MagCacheConfig

        if ctx.run_once is None:
            raise RuntimeError("MagCache needs a calibration run, but no run function was given")
        model = _uncompiled(pipe)
        model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=ctx.steps))
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                ctx.run_once(pipe)
        finally:
            model.disable_cache()
        lists = parse_mag_ratios(printed.getvalue())
        if not lists:
            raise RuntimeError(f"MagCache calibration printed no ratios: {printed.getvalue()[:300]!r}")
        ratios = [sum(vals) / len(vals) for vals in zip(*lists)]
        ctx.notes.append(f"MagCache calibrated on one uncached generation ({len(lists)} printed lists averaged)")
        return ratios


def parse_mag_ratios(text: str) -> list[list[float]]:
    """The ratio lists MagCache's calibration prints (``[1.0, 1.06, ...]`` lines)."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if re.fullmatch(r"\[[-+0-9.eE, ]+\]", line):
            values = ast.literal_eval(line)
            if values:
                found.append([float(v) for v in values])
    return found


# ---- cache-dit ----------------------------------------------------------------------------
class CacheDitDBCachePeer(Peer):
    """cache-dit's DBCache. Pipelines cache-dit recognises by class name (``WanPipeline``) are
    passed directly; others (the zoo's ``TinyWanPipeline`` subclass) get the ``BlockAdapter``
    cache-dit's own Wan adapter builds (blocks ``transformer.blocks``, ``ForwardPattern.Pattern_2``,
    separate CFG), which is what its docs tell users of unregistered pipelines to pass."""

    key, title, library = "dbcache", "DBCache", "cache-dit"
    id_knobs = ("residual_diff_threshold",)

    def __init__(self, residual_diff_threshold: float = 0.08, Fn_compute_blocks: int = 1, Bn_compute_blocks: int = 0,  # noqa: N803
                 **more: Any) -> None:
        """``more``: further ``DBCacheConfig`` fields (e.g. ``max_warmup_steps``, default 8)."""
        super().__init__(
            residual_diff_threshold=residual_diff_threshold, Fn_compute_blocks=Fn_compute_blocks, Bn_compute_blocks=Bn_compute_blocks,
            **more,
        )

    def available(self) -> str | None:
        try:
            import cache_dit  # noqa: F401
        except Exception as err:  # ImportError, or a broken install
            return f"cache-dit is not importable ({type(err).__name__}: {err}); install the extra: pip install -e '.[bench]'"
        return None

    def _enable(self, pipe: Any, ctx: PeerContext) -> None:
        import cache_dit
        from cache_dit import BlockAdapter, BlockAdapterRegister, ForwardPattern

        config = cache_dit.DBCacheConfig(**self.knobs)
        if BlockAdapterRegister.is_supported(pipe):
            cache_dit.enable_cache(pipe, cache_config=config)
            return
        model = pipe.transformer
        adapter = BlockAdapter(
            pipe=pipe, transformer=model, blocks=model.blocks, forward_pattern=ForwardPattern.Pattern_2,
            check_forward_pattern=True, has_separate_cfg=True,
        )
        cache_dit.enable_cache(adapter, cache_config=config)
        ctx.notes.append("cache-dit: pipeline class not registered, passed an explicit BlockAdapter (as for Wan)")

    def disable(self, pipe: Any) -> None:
        import cache_dit

        model = _uncompiled(pipe)
        pipe.transformer = model
        cache_dit.disable_cache(pipe)


PEERS: dict[str, type[Peer]] = {
    "fbcache": FirstBlockCachePeer,
    "taylorseer": TaylorSeerPeer,
    "magcache": MagCachePeer,
    "pab": PyramidAttentionBroadcastPeer,
    "fastercache": FasterCachePeer,
    "dbcache": CacheDitDBCachePeer,
}


def peer_sweep(quick: bool = False) -> list[Peer]:
    """Each peer at its documented default and one more aggressive main-knob value."""
    if quick:
        return [FirstBlockCachePeer(0.05), FasterCachePeer()]
    return [
        FirstBlockCachePeer(0.05), FirstBlockCachePeer(0.1),
        TaylorSeerPeer(cache_interval=5), TaylorSeerPeer(cache_interval=3),
        MagCachePeer(threshold=0.06), MagCachePeer(threshold=0.12),
        PyramidAttentionBroadcastPeer(2), PyramidAttentionBroadcastPeer(3),
        FasterCachePeer(),
        CacheDitDBCachePeer(0.08), CacheDitDBCachePeer(0.16),
    ]


__all__: Sequence[str] = [
    "Peer", "PeerContext", "PEERS", "peer_sweep", "parse_mag_ratios", "WAN_TAYLORSEER_IDENTIFIERS",
    "FirstBlockCachePeer", "TaylorSeerPeer", "MagCachePeer", "PyramidAttentionBroadcastPeer", "FasterCachePeer",
    "CacheDitDBCachePeer",
]
