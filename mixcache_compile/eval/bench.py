"""``mixcache bench``: this project's policies against uncached baselines and peer caching methods.

Two workloads, one process:

* fidelity: the shipped tiny text-to-video model (``mixcache_compile.zoo``), a few prompts x
  seeds; each method's output is compared (PSNR / SSIM, ``eval/metrics.py``) with the uncached
  eager output of the same prompt and seed;
* speed: a larger random-weight ``WanTransformer3DModel`` (same class; speed does not depend
  on trained weights) driven by a stock ``WanPipeline`` (``vae=None``, prompt embeddings given,
  ``output_type="latent"``); every method's generation time is the median of repetitions
  interleaved round-robin with both uncached baselines (``eval/timing.py``), and its speedup is
  measured against the uncached baseline of its own mode: eager methods against the eager
  pipeline, compiled methods against plain ``torch.compile`` (inductor).

Methods: uncached eager and inductor; ``mixcache_compile.enable(pipe, policy=..., engine=...)``
for every policy of ``POLICIES`` that imports (engine ``eager`` in eager mode, ``inductor`` in
compiled mode); the peers of ``eval/peers.py`` (diffusers cache hooks, cache-dit DBCache), also
under ``torch.compile``. All methods use the same scheduler, step count, prompts and seeds.

Writes ``DIR/bench.json``, ``DIR/bench.md`` and ``DIR/pareto.png``. ``python -m
mixcache_compile.eval.bench --help`` lists the options; ``docs/bench.md`` explains the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..progress import add_quiet_flag
from .peers import Peer, PeerContext, peer_sweep

PROMPTS = ("red circle moving left", "blue square moving down", "green circle moving up", "yellow square moving right")
MAIN_KNOBS = ("threshold", "tau", "interval", "attn_interval", "every")  # a dynamic policy's swept knob, first found
# Sweeps chosen by hand where the generic "main knob x2 / +1" does not fit: (knobs, compiled by default).
SWEEP_OVERRIDES: dict[str, list[tuple[dict[str, Any], bool]]] = {
    # the defaults Fn=Bn=8 need more than 16 blocks (the models here have 4 and 12)
    "dbcache": [({"Fn": 1, "Bn": 1}, True), ({"Fn": 1, "Bn": 1, "threshold": 0.16}, False)],
    # tau and the initial interval barely move this policy at 20-30 steps; the warm-up share does
    "mixcache": [({"warmup": 0.1}, False)],
}
# --quick: these ids (fnmatch patterns) only; compiled: the baseline and static(every=2) only.
QUICK_METHODS = ("mixcache:static(every=2)", "mixcache:fbcache", "diffusers:fbcache(threshold=0.05)", "diffusers:fastercache*")
QUICK_COMPILED = ("baseline:*", "mixcache:static(every=2)")


# ---- configuration -------------------------------------------------------------------------
@dataclass
class BenchConfig:
    out: Path = Path("out/bench")
    steps: int = 20
    repeats: int = 3
    prompts: int = 3
    seeds: int = 2
    guidance_scale: float = 5.0
    methods: list[str] | None = None  # patterns; None = all
    compile: bool = True
    compile_all: bool = False  # compiled rows for every knob value, not only each method's default
    quick: bool = False
    threads: int | None = None
    bench_layers: int = 12
    bench_heads: int = 4
    bench_head_dim: int = 32
    bench_frames: int = 2  # latent frames
    bench_size: int = 32  # latent height = width (patch 2x2: tokens = frames * (size / 2) ** 2)
    argv: list[str] = field(default_factory=list)
    quiet: bool = False  # no progress bars

    @property
    def bench_tokens(self) -> int:
        return self.bench_frames * (self.bench_size // 2) ** 2


def parse_args(argv: Sequence[str] | None) -> BenchConfig:
    p = argparse.ArgumentParser(
        prog="mixcache bench",
        description="Benchmark this project's caching policies against uncached eager / torch.compile baselines and peer "
                    "caching methods: fidelity on the shipped model, speed on a larger random-weight model of the same class. "
                    "Writes DIR/bench.json, DIR/bench.md, DIR/pareto.png (see docs/bench.md).",
    )
    p.add_argument("--quick", action="store_true", help="smoke run (~1-2 min): 8 steps, one prompt, a few methods, small speed model")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="output directory (default out/bench)")
    p.add_argument("--methods", default=None,
                   help="comma-separated patterns (fnmatch; plain words match as substrings) over method ids such as "
                        "'mixcache:static(every=2)', 'diffusers:fbcache(threshold=0.05)', 'cache-dit:dbcache'; "
                        "the baselines always run")
    p.add_argument("--steps", type=int, default=None, help="denoising steps of every generation (default 20; quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 3; quick 1)")
    p.add_argument("--prompts", type=int, default=None, help=f"fidelity prompts, at most {len(PROMPTS)} (default 3; quick 1)")
    p.add_argument("--seeds", type=int, default=None, help="fidelity seeds per prompt (default 2; quick 1)")
    p.add_argument("--no-compile", action="store_true", help="eager rows only (no torch.compile baseline or compiled methods)")
    p.add_argument("--compile-all", action="store_true", help="compiled rows for every knob value (default: each method's first)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's setting)")
    p.add_argument("--bench-layers", type=int, default=None, help="blocks of the speed model (default 12; quick 2)")
    p.add_argument("--bench-frames", type=int, default=None, help="latent frames of the speed model's input (default 2)")
    p.add_argument("--bench-size", type=int, default=None, help="latent height=width of the speed model's input (default 32; quick 16)")
    add_quiet_flag(p)
    a = p.parse_args(list(argv) if argv is not None else None)
    quick = a.quick
    cfg = BenchConfig(
        out=a.out,
        steps=_pick(a.steps, 8 if quick else 20),
        repeats=_pick(a.repeats, 1 if quick else 3),
        prompts=_pick(a.prompts, 1 if quick else 3),
        seeds=_pick(a.seeds, 1 if quick else 2),
        methods=[m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None,
        compile=not a.no_compile,
        compile_all=a.compile_all,
        quick=quick,
        threads=a.threads,
        bench_layers=_pick(a.bench_layers, 2 if quick else 12),
        bench_frames=_pick(a.bench_frames, 2),
        bench_size=_pick(a.bench_size, 16 if quick else 32),
        argv=list(argv) if argv is not None else sys.argv[1:],
        quiet=a.quiet,
    )
    if not 1 <= cfg.prompts <= len(PROMPTS):
        p.error(f"--prompts must be 1..{len(PROMPTS)}")
    for name in ("steps", "repeats", "seeds", "bench_layers", "bench_frames"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.bench_size < 2 or cfg.bench_size % 2:
        p.error("--bench-size must be an even number >= 2")
    return cfg


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


# ---- workloads -----------------------------------------------------------------------------
class Workload:
    """A base pipeline, the samples to generate and how; ``fresh_pipe`` gives each method its own copy."""

    name = ""

    def __init__(self, base: Any, samples: list[tuple[str, int]], steps: int) -> None:
        self.base = base
        self.samples = samples
        self.steps = steps
        base.set_progress_bar_config(disable=True)

    @property
    def num_layers(self) -> int:
        return len(self.base.transformer.blocks)

    def fresh_pipe(self) -> Any:
        return copy.deepcopy(self.base)

    def generate(self, pipe: Any, sample: tuple[str, int]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class ShippedWorkload(Workload):
    name = "shipped"

    def __init__(self, steps: int, prompts: int, seeds: int, guidance_scale: float) -> None:
        from ..zoo import load_pipeline

        self.guidance_scale = guidance_scale
        super().__init__(load_pipeline(), [(p, s) for p in PROMPTS[:prompts] for s in range(seeds)], steps)

    def generate(self, pipe: Any, sample: tuple[str, int]) -> torch.Tensor:
        from ..zoo import default_call_kwargs

        prompt, seed = sample
        kwargs = default_call_kwargs(num_inference_steps=self.steps, guidance_scale=self.guidance_scale)
        with torch.no_grad():
            return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **kwargs).frames

    def describe(self) -> dict[str, Any]:
        from ..zoo.pipeline import WEIGHTS_FILE, load_config

        cfg = load_config()
        return {
            "model": "shipped tiny WanTransformer3DModel (mixcache_compile.zoo)",
            "transformer": cfg["transformer"],
            "video": cfg["video"],
            "training": cfg.get("training"),
            "weights_sha256": _sha256(WEIGHTS_FILE),
            "tokens": (cfg["video"]["num_frames"] // cfg["transformer"]["patch_size"][0])
            * (cfg["video"]["height"] // cfg["transformer"]["patch_size"][1])
            * (cfg["video"]["width"] // cfg["transformer"]["patch_size"][2]),
            "samples": [{"prompt": p, "seed": s} for p, s in self.samples],
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": cfg["scheduler"],
        }


class SpeedWorkload(Workload):
    """Random-weight WanTransformer3DModel in a stock WanPipeline, fed prompt embeddings."""

    name = "speed"
    TEXT_LEN, TEXT_DIM = 16, 64

    def __init__(self, cfg: BenchConfig) -> None:
        from diffusers import WanPipeline, WanTransformer3DModel

        from ..zoo.pipeline import load_scheduler

        self.cfg = cfg
        self.model_config = dict(
            patch_size=(1, 2, 2), num_attention_heads=cfg.bench_heads, attention_head_dim=cfg.bench_head_dim,
            in_channels=16, out_channels=16, text_dim=self.TEXT_DIM, freq_dim=64,
            ffn_dim=4 * cfg.bench_heads * cfg.bench_head_dim, num_layers=cfg.bench_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
        )
        torch.manual_seed(0)
        model = WanTransformer3DModel(**self.model_config).eval()
        base = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=load_scheduler())
        g = torch.Generator().manual_seed(1234)
        self.prompt_embeds = torch.randn(1, self.TEXT_LEN, self.TEXT_DIM, generator=g)
        self.negative_embeds = torch.randn(1, self.TEXT_LEN, self.TEXT_DIM, generator=g)
        super().__init__(base, [("random prompt embedding", 0)], cfg.steps)
        # Pixel sizes WanPipeline turns into the wanted latent size (VAE factors 4 temporal, 8 spatial).
        self.call = dict(
            height=8 * cfg.bench_size, width=8 * cfg.bench_size, num_frames=4 * (cfg.bench_frames - 1) + 1,
            num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, output_type="latent",
        )

    def generate(self, pipe: Any, sample: tuple[str, int]) -> torch.Tensor:
        with torch.no_grad():
            return pipe(prompt_embeds=self.prompt_embeds, negative_prompt_embeds=self.negative_embeds,
                        generator=torch.Generator().manual_seed(sample[1]), **self.call).frames

    def describe(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.base.transformer.parameters())
        return {
            "model": "random-weight WanTransformer3DModel in diffusers.WanPipeline (vae=None, prompt embeddings, latent output)",
            "transformer": {**self.model_config, "patch_size": list(self.model_config["patch_size"])},
            "parameters": params,
            "latent": [16, self.cfg.bench_frames, self.cfg.bench_size, self.cfg.bench_size],
            "tokens": self.cfg.bench_tokens,
            "text_tokens": self.TEXT_LEN,
            "steps": self.steps,
            "guidance_scale": self.cfg.guidance_scale,
            "scheduler": "the shipped model's FlowMatchEulerDiscreteScheduler (shift 2.0)",
        }


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


# ---- methods -------------------------------------------------------------------------------
@dataclass
class Handle:
    """A method switched on in one pipeline: reset it before a generation, read its statistics."""

    reset: Callable[[], None] = lambda: None
    stats: Callable[[], dict[str, Any]] = dict
    reset_stats: Callable[[], None] = lambda: None
    notes: list[str] = field(default_factory=list)
    calls: Callable[[], int] | None = None  # transformer calls the method saw (mixcache sessions), None if unknown

    def check_calls(self, before: int | None, expected: int) -> None:
        """Raise if the method did not see the transformer calls of the generation that just ran."""
        if self.calls is None or before is None:
            return
        seen = self.calls() - before
        if seen != expected:
            raise RuntimeError(
                f"the mixcache session saw {seen} of the generation's {expected} transformer calls: the compiled "
                "model ran without it (the backend fell back to an uncached compile, or Dynamo reused a compiled "
                "entry that is not this session's)"
            )


@dataclass
class Method:
    id: str  # "mixcache:static(every=2)"
    family: str  # "baseline" | "mixcache" | "diffusers" | "cache-dit"
    knob: str
    setup: Callable[[Any, Workload, bool, PeerContext], Handle]  # (pipe, workload, compiled, ctx)
    compiled_by_default: bool = True  # compiled row without --compile-all
    compile_how: str = ""

    @property
    def is_baseline(self) -> bool:
        return self.family == "baseline"


def _baseline_setup(pipe: Any, workload: Workload, compiled: bool, ctx: PeerContext) -> Handle:
    if compiled:
        pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    return Handle()


def _mixcache_method(policy: str, knobs: Callable[[Workload], dict[str, Any]] | dict[str, Any], label: str, knob_text: str,
                     compiled_by_default: bool = True) -> Method:
    def setup(pipe: Any, workload: Workload, compiled: bool, ctx: PeerContext) -> Handle:
        import mixcache_compile

        options = knobs(workload) if callable(knobs) else dict(knobs)
        session = mixcache_compile.enable(pipe, policy=policy, engine="inductor" if compiled else "eager", **options)

        def stats() -> dict[str, Any]:
            s = session.stats()
            return {"computed_fraction": s["computed_fraction"], "fallbacks": s["fallbacks"], "actions": s["actions"],
                    "summary": session.summary()}

        return Handle(reset=session.reset, stats=stats, reset_stats=session.reset_stats,
                      calls=lambda: session.stats()["calls"])

    return Method(f"mixcache:{label}", "mixcache", knob_text, setup, compiled_by_default,
                  "mixcache_compile.enable(engine='inductor')")


def _peer_method(peer: Peer, compiled_by_default: bool) -> Method:
    def setup(pipe: Any, workload: Workload, compiled: bool, ctx: PeerContext) -> Handle:
        why = peer.available()
        if why:
            raise RuntimeError(why)
        peer.enable(pipe, ctx, compiled=compiled)
        return Handle(reset=lambda: peer.reset(pipe), notes=ctx.notes)

    return Method(peer.id, peer.library, peer.knob_text, setup, compiled_by_default,
                  "cache enabled, then torch.compile(pipe.transformer)")


def main_knob(cls: type) -> tuple[str | None, Any]:
    """The knob a dynamic policy is swept over (first of ``MAIN_KNOBS`` with a numeric default)."""
    params = inspect.signature(cls).parameters
    for name in MAIN_KNOBS:
        param = params.get(name)
        if param is not None and isinstance(param.default, (int, float)) and not isinstance(param.default, bool):
            return name, param.default
    return None, None


def _more_aggressive(value: int | float) -> int | float:
    return value + 1 if isinstance(value, int) else round(value * 2, 6)


def build_methods(cfg: BenchConfig) -> tuple[list[Method], list[dict[str, str]]]:
    """All methods (baseline first) and the ones that could not be included, with why."""
    from ..policies import POLICIES, config_class

    skipped: list[dict[str, str]] = []
    methods = [Method("baseline:uncached", "baseline", "", _baseline_setup, True, "torch.compile(pipe.transformer, fullgraph=True)")]
    methods.append(_mixcache_method("none", {}, "none", "", compiled_by_default=True))
    methods.append(_mixcache_method("static", {"every": 2, "reuse": "step"}, "static(every=2)", "every=2, reuse=step"))
    methods.append(_mixcache_method("static", {"every": 3, "reuse": "step"}, "static(every=3)", "every=3, reuse=step", False))

    def block_schedule(w: Workload) -> dict[str, Any]:
        last = w.num_layers - 1  # skip blocks 1..L-2 (first and last computed) on every other step
        if last < 2:
            raise ValueError(f"the block schedule needs at least 3 blocks, the model has {w.num_layers}")
        return {"schedule": {s: f"block:1-{last}" for s in range(2, w.steps - 1, 2)}}

    methods.append(_mixcache_method("static", block_schedule, "static(block)", "blocks 1..L-2 reused on even steps 2..n-2"))
    for name in POLICIES:
        if name in ("none", "static"):
            continue
        try:
            cls = config_class(name)  # its fields are the options, with their defaults
            knob, default = main_knob(cls)
        except Exception as err:  # ValueError from the registry, or an import-time error
            skipped.append({"method": f"mixcache:{name}", "reason": f"{type(err).__name__}: {err}"})
            continue
        methods.append(_mixcache_method(name, {}, name, "defaults"))
        params = inspect.signature(cls).parameters
        overrides = [(k, c) for k, c in SWEEP_OVERRIDES.get(name, []) if set(k) <= set(params)]
        if overrides:
            for knobs, compiled_default in overrides:
                text = ", ".join(f"{k}={v}" for k, v in knobs.items())
                defaults = ", ".join(f"{k}={params[k].default}" for k in knobs)
                methods.append(_mixcache_method(name, knobs, f"{name}({text})", f"{text} (defaults {defaults})", compiled_default))
            continue
        if knob is None:
            skipped.append({"method": f"mixcache:{name} sweep", "reason": f"no knob among {MAIN_KNOBS}: defaults only"})
            continue
        value = _more_aggressive(default)
        methods.append(_mixcache_method(name, {knob: value}, f"{name}({knob}={value:g})", f"{knob}={value:g} (default {default:g})", False))
    seen: set[str] = set()
    for peer in peer_sweep(quick=False):
        first = peer.name not in seen
        seen.add(peer.name)
        methods.append(_peer_method(peer, compiled_by_default=first))
    if cfg.quick and cfg.methods is None:
        methods = [m for m in methods if m.is_baseline or _matches(m.id, QUICK_METHODS, exact=True)]
    elif cfg.methods is not None:
        methods = [m for m in methods if m.is_baseline or _matches(m.id, cfg.methods)]
    return methods, skipped


def _matches(method_id: str, patterns: Sequence[str], exact: bool = False) -> bool:
    """fnmatch patterns (``*``, ``?``); a pattern without wildcards matches as a substring
    (or, with ``exact``, only the whole id)."""
    ident = method_id.lower()
    for pat in patterns:
        pat = pat.lower()
        if "*" in pat or "?" in pat:
            if fnmatch.fnmatchcase(ident, pat.replace("[", "[[]")):
                return True
        elif pat == ident or (not exact and pat in ident):
            return True
    return False


def compiled_rows_for(cfg: BenchConfig, methods: list[Method]) -> list[Method]:
    if not cfg.compile:
        return []
    if cfg.quick and cfg.methods is None:
        return [m for m in methods if _matches(m.id, QUICK_COMPILED, exact=True)]
    return [m for m in methods if m.is_baseline or cfg.compile_all or m.compiled_by_default]


# ---- running -------------------------------------------------------------------------------
def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 400 else text[:397] + "..."


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def _new_row(method: Method, mode: str) -> dict[str, Any]:
    return {
        "id": method.id, "family": method.family, "knob": method.knob, "mode": mode,
        "baseline": "eager" if mode == "eager" else "inductor",
        "compile_how": method.compile_how if mode == "compiled" else "",
        "status": "ok", "error": None, "error_where": None, "error_phase": None,
        "time_s": None, "baseline_time_s": None, "speedup": None, "speedup_vs_eager": None, "first_call_s": None,
        "cpu_time_s": None, "speedup_cpu": None,
        "psnr": None, "ssim": None, "psnr_min": None, "psnr_per_sample": [], "fidelity_from": None,
        "computed_fraction": None, "computed_fraction_speed": None, "psnr_speed_model": None,
        "timing_group": None, "notes": [], "session_summary": None,
    }


def _fail(row: dict[str, Any], phase: str, err: BaseException) -> None:
    row["status"] = "failed"
    row["error"] = row["error"] or _error_text(err)
    row["error_where"] = row["error_where"] or _where(err)
    row["error_phase"] = row["error_phase"] or phase


def _progress(iterable: Any, desc: str, total: int | None = None) -> Any:
    from ..progress import progress

    return progress(iterable, desc=desc, total=total, unit="method")


def _fidelity(rows: dict[tuple[str, str], dict[str, Any]], methods: list[Method], work: ShippedWorkload) -> dict[str, Any]:
    """Eager rows: every sample with the method vs the uncached eager output of that sample."""
    from .metrics import psnr, ssim

    reference_pipe = work.fresh_pipe()
    references = [work.generate(reference_pipe, s) for s in work.samples]
    del reference_pipe
    memo: dict[Any, Any] = {}
    bar = _progress(methods, "fidelity (shipped model)")
    for method in bar:
        bar.set_postfix_str(method.id[:40])
        row = rows[(method.id, "eager")]
        ctx = PeerContext(work.steps, run_once=lambda p: work.generate(p, work.samples[0]), memo=memo)
        try:
            pipe = work.fresh_pipe()
            handle = method.setup(pipe, work, False, ctx)
            handle.reset_stats()
            outputs = []
            for sample in work.samples:
                handle.reset()
                before = handle.calls() if handle.calls else None
                outputs.append(work.generate(pipe, sample))
                handle.check_calls(before, 2 * work.steps)
        except Exception as err:
            _fail(row, "fidelity", err)
            continue
        finally:
            row["notes"].extend(n for n in ctx.notes if n not in row["notes"])
        per = [psnr(o, r) for o, r in zip(outputs, references)]
        row["psnr_per_sample"] = per
        row["psnr"] = psnr(torch.cat(outputs), torch.cat(references))  # pooled MSE over all samples
        row["psnr_min"] = min(per)
        row["ssim"] = ssim(torch.cat(outputs), torch.cat(references))
        row["fidelity_from"] = "eager"
        stats = handle.stats()
        if "computed_fraction" in stats:
            row["computed_fraction"] = stats["computed_fraction"]
            row["session_summary"] = stats.get("summary")
            _fallback_notes(row, stats, "fidelity model")
        del pipe, handle
    return {"reference_range": [float(torch.cat(references).min()), float(torch.cat(references).max())]}


def _fallback_notes(row: dict[str, Any], stats: dict[str, Any], model: str) -> None:
    """The runtime's most frequent reasons for computing in full what the policy asked to reuse."""
    for reason, count in sorted(stats.get("fallbacks", {}).items(), key=lambda kv: -kv[1])[:2]:
        row["notes"].append(f"{model}: {count} call(s) fell back to FULL ({reason})")


def _speed(rows: dict[tuple[str, str], dict[str, Any]], plan: list[tuple[Method, str]], work: SpeedWorkload,
           repeats: int, memo: dict[Any, Any], group: str, own_baselines: bool) -> dict[str, Any]:
    """Set every row of ``plan`` up in its own pipeline (first call = warm-up / compile), then
    time them round-robin (the plan includes both baselines), one untimed and ``repeats`` timed
    rounds, medians. ``own_baselines``: write the baselines' timings into their rows (the first
    group); a later group only uses its baseline runs for its own rows' speedups."""
    from torch._dynamo.utils import counters

    from .metrics import psnr
    from .timing import interleaved_medians, timed

    sample = work.samples[0]
    expected_calls = 2 * work.steps
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    first_outputs: dict[tuple[str, str], torch.Tensor] = {}
    errors: dict[tuple[str, str], BaseException] = {}
    keep: list[Any] = []
    bar = _progress(plan, f"speed model, {group}: set up + first call/compile")
    for method, mode in bar:
        key = (method.id, mode)
        bar.set_postfix_str(f"{method.id[:36]} [{mode}]")
        row = rows[key]
        if row["status"] == "failed":
            row["notes"].append("speed not measured: the method failed earlier")
            continue
        compiled = mode == "compiled"
        ctx = PeerContext(work.steps, run_once=lambda p: work.generate(p, sample), memo=memo)
        try:
            pipe = work.fresh_pipe()
            handle = method.setup(pipe, work, compiled, ctx)
            handle.reset_stats()
            handle.reset()
            before = handle.calls() if handle.calls else None
            first_s, out = timed(lambda p=pipe: work.generate(p, sample))
            handle.check_calls(before, expected_calls)
        except Exception as err:
            if method.is_baseline and not own_baselines:
                continue
            _fail(row, "speed setup" + (" (compiled)" if compiled else ""), err)
            continue
        finally:
            row["notes"].extend(n for n in ctx.notes if n not in row["notes"])
        if own_baselines or not method.is_baseline:
            row["first_call_s"] = first_s
            row["timing_group"] = group
        first_outputs[key] = out
        stats = handle.stats()
        if "computed_fraction" in stats:
            row["computed_fraction_speed"] = stats["computed_fraction"]
            _fallback_notes(row, stats, "speed model")
        keep.append((pipe, handle))

        def run(p: Any = pipe, h: Handle = handle, k: tuple[str, str] = key) -> object:
            if k in errors:
                return None
            try:
                h.reset()
                before = h.calls() if h.calls else None
                result = work.generate(p, sample)
                h.check_calls(before, expected_calls)  # a mixcache row must run through its own session
                return result
            except Exception as err:  # a failure in a timed round marks the row; its timing is discarded
                errors[k] = err
                return None

        fns[key] = run
    # One untimed round first: setting up a later row (hooks, another compile) can invalidate
    # Dynamo guards of rows set up before it, and their re-traces must not land in timed rounds.
    total = (1 + repeats) * len(fns)
    tick = _progress(range(total), f"timing {group}: 1 untimed + {repeats} round(s) x {len(fns)} rows", total=total)
    tick_iter = iter(tick)
    graphs = counters["stats"]
    done = {"calls": 0}
    recompiled: dict[tuple[str, str], int] = {}

    # Next to the wall-clock medians, the process CPU time of the same timed calls: with one
    # thread it counts the work done and not the time other processes held the cores.
    cpu: dict[tuple[str, str], list[float]] = {k: [] for k in fns}

    def ticking(key: tuple[str, str], fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            before, cpu0 = graphs["unique_graphs"], time.process_time()
            result = fn()
            done["calls"] += 1
            if done["calls"] > len(fns):  # a timed round
                cpu[key].append(time.process_time() - cpu0)
                if graphs["unique_graphs"] > before:  # a timed call that compiled
                    recompiled[key] = recompiled.get(key, 0) + graphs["unique_graphs"] - before
            next(tick_iter, None)
            return result

        return call

    medians = interleaved_medians({k: ticking(k, f) for k, f in fns.items()}, repeats=repeats, warmup=1) if fns else {}
    tick.close()
    for key, n in recompiled.items():
        rows[key]["notes"].append(f"Dynamo compiled {n} graph(s) during timed rounds (time includes it)")
    base_keys = {"eager": ("baseline:uncached", "eager"), "compiled": ("baseline:uncached", "compiled")}
    for key, err in errors.items():
        if key[0] != "baseline:uncached" or own_baselines:
            _fail(rows[key], "timed rounds", err)
    eager_t = medians.get(base_keys["eager"]) if base_keys["eager"] not in errors else None
    for key, t in medians.items():
        row = rows[key]
        if key in errors or (key in base_keys.values() and not own_baselines):
            continue
        row["time_s"] = t
        base = medians.get(base_keys[row["mode"]]) if base_keys[row["mode"]] not in errors else None
        if base is None and row["mode"] == "compiled":
            row["notes"].append("inductor baseline unavailable: speedup against the eager baseline")
            row["baseline"] = "eager"
            base = eager_t
        row["baseline_time_s"] = base
        row["speedup"] = base / t if base else None
        row["speedup_vs_eager"] = eager_t / t if eager_t else None
        row["cpu_time_s"] = statistics.median(cpu[key]) if cpu[key] else None
        base_key = base_keys["compiled"] if row["baseline"] == "inductor" else base_keys["eager"]
        base_cpu = statistics.median(cpu[base_key]) if cpu.get(base_key) else None
        row["speedup_cpu"] = base_cpu / row["cpu_time_s"] if base_cpu and row["cpu_time_s"] else None
        ref = first_outputs.get(base_keys["compiled"] if row["baseline"] == "inductor" else base_keys["eager"])
        if ref is not None and key in first_outputs:
            try:
                row["psnr_speed_model"] = psnr(first_outputs[key], ref, data_range=float(ref.max() - ref.min()))
            except ValueError:
                pass
    keep.clear()
    return {
        "rows_timed": len(fns), "rows_recompiled_in_timed_rounds": len(recompiled),
        "baseline_s": {mode: medians.get(k) for mode, k in base_keys.items()},
    }


def _skip_compiled_of_failed(rows: dict[tuple[str, str], dict[str, Any]]) -> None:
    """A configuration that failed eagerly is not tried compiled (the row says so)."""
    for (mid, mode), row in rows.items():
        eager = rows.get((mid, "eager"))
        if mode == "compiled" and eager is not None and eager["status"] == "failed":
            row["status"] = "failed"
            row["error"] = f"not attempted: the eager run failed ({eager['error']})"
            row["error_phase"] = "not attempted"
            row["error_where"] = eager["error_where"]


def _inherit_fidelity(rows: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Compiled rows carry the fidelity of the same configuration's eager run (same policy and
    knobs; compilation changes numerics only at float rounding level, see ``psnr_speed_model``)."""
    for (mid, mode), row in rows.items():
        eager = rows.get((mid, "eager"))
        if mode != "compiled" or eager is None or eager["psnr"] is None:
            continue
        for k in ("psnr", "ssim", "psnr_min", "psnr_per_sample", "computed_fraction"):
            row[k] = eager[k]
        row["fidelity_from"] = "eager run of the same configuration"


def run(cfg: BenchConfig) -> dict[str, Any]:
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Dozens of compiled copies of the same forward in one process: lift Dynamo's per-code
    # recompile limit so no compiled row silently falls back to eager.
    torch._dynamo.config.recompile_limit = 512
    torch._dynamo.config.accumulated_recompile_limit = 8192
    methods, skipped = build_methods(cfg)
    compiled = compiled_rows_for(cfg, methods)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for m in methods:
        rows[(m.id, "eager")] = _new_row(m, "eager")
    for m in compiled:
        rows[(m.id, "compiled")] = _new_row(m, "compiled")
    shipped = ShippedWorkload(cfg.steps, cfg.prompts, cfg.seeds, cfg.guidance_scale)
    speed_work = SpeedWorkload(cfg)
    meta: dict[str, Any] = {
        "command": "mixcache bench " + " ".join(shlex.quote(a) for a in cfg.argv),
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "versions": _versions(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": _loadavg(),
        "platform": platform.platform(),
        "steps": cfg.steps, "repeats": cfg.repeats, "quick": cfg.quick,
        "fidelity_model": shipped.describe(),
        "speed_model": speed_work.describe(),
        "timing": "each row: one first generation (includes compilation) when it is set up; then one untimed round and "
                  "`repeats` timed rounds in which every row runs once, round-robin with both uncached baselines; median "
                  "per row (eval/timing.py interleaved_medians)",
        "dynamo": {"recompile_limit": 512, "accumulated_recompile_limit": 8192},
    }
    t0 = time.perf_counter()
    with _quiet():
        meta["fidelity"] = _fidelity(rows, methods, shipped)
    meta["fidelity_s"] = time.perf_counter() - t0
    torch._dynamo.reset()  # the fidelity pipelines are gone; start the speed phase with empty Dynamo caches
    _skip_compiled_of_failed(rows)
    # Two timing groups. A peer's hooks compiled by torch.compile make Dynamo serve the models of
    # mixcache rows set up before it from a compiled entry that is not theirs (their sessions stop
    # seeing calls; every mixcache call is checked). So: first everything except the compiled
    # peers, then the compiled peers with fresh runs of both baselines.
    plan = [(m, "eager") for m in methods] + [(m, "compiled") for m in compiled]
    late = [(m, mode) for m, mode in plan if mode == "compiled" and m.family in ("diffusers", "cache-dit")]
    baselines = [(m, mode) for m, mode in plan if m.is_baseline]
    first = [pm for pm in plan if pm not in late]
    memo: dict[Any, Any] = {}
    t0 = time.perf_counter()
    with _quiet():
        meta["speed"] = {"A": _speed(rows, first, speed_work, cfg.repeats, memo, "group A", own_baselines=True)}
        torch._dynamo.reset()
        if late:
            meta["speed"]["B"] = _speed(rows, baselines + late, speed_work, cfg.repeats, memo, "group B", own_baselines=False)
    meta["speed_s"] = time.perf_counter() - t0
    meta["timing_groups"] = ("A: baselines, eager rows and compiled mixcache rows; B: compiled peers (diffusers, cache-dit) "
                             "with their own runs of both baselines in the same rounds")
    _inherit_fidelity(rows)
    sha_end = _sha256(__import__("mixcache_compile.zoo.pipeline", fromlist=["WEIGHTS_FILE"]).WEIGHTS_FILE)
    if sha_end != meta["fidelity_model"]["weights_sha256"]:
        meta["warning"] = "the shipped weights file changed during the run"
    meta["load_average_end"] = _loadavg()
    meta["wall_s"] = time.perf_counter() - started
    return {"meta": meta, "rows": list(rows.values()), "skipped": skipped}


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: how busy the machine was (timings are wall-clock)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "cache_dit", "mixcache_compile"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", None)
        except Exception:
            out[mod] = None
    return out


@contextlib.contextmanager
def _quiet() -> Any:
    """Keep the terminal to the progress bars: library warnings and INFO logs are not results."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "CACHE_DIT", "torch._dynamo", "torch._inductor")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlevel = dlog.get_verbosity()
        dlog.set_verbosity_error()
    except Exception:
        dlog = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)
            if dlog is not None:
                dlog.set_verbosity(dlevel)


# ---- outputs -------------------------------------------------------------------------------
def write_json(results: dict[str, Any], path: Path) -> Path:
    """JSON with ``Infinity`` for identical outputs (Python's json reads it back as inf)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


def _f(value: float | None, spec: str, inf: str = "∞") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return inf
    return format(value, spec)


def _row_order(row: dict[str, Any]) -> tuple:
    fam = {"baseline": 0, "mixcache": 1, "diffusers": 2, "cache-dit": 3}.get(row["family"], 4)
    return (0 if row["mode"] == "eager" else 1, fam, row["id"])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | knob | mode | speedup | vs eager | CPU-time speedup | time (s) | first call (s) | PSNR (dB) | SSIM "
            "| computed | notes |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in sorted(rows, key=_row_order):
        notes = list(r.get("notes") or [])
        if r["status"] != "ok":
            where = f" ({r['error_where']})" if r.get("error_where") else ""
            notes.insert(0, f"**FAILED** in {r.get('error_phase') or 'run'}: `{r['error']}`{where}")
        if r["mode"] == "compiled" and r.get("fidelity_from"):
            notes.append("fidelity: eager run of same config")
        if r.get("timing_group") == "group B":
            notes.append("timed in group B, against that group's baseline runs")
        cf = r.get("computed_fraction")
        cfs = r.get("computed_fraction_speed")
        computed = "—" if cf is None and cfs is None else f"{_f(cf, '.2f')} / {_f(cfs, '.2f')}"
        psnr = _f(r.get("psnr"), ".2f")
        if r.get("psnr_min") is not None and r.get("psnr") is not None and not math.isinf(r["psnr"]):
            psnr += f" (min {_f(r['psnr_min'], '.1f')})"
        lines.append(
            f"| `{r['id']}` | {r['knob'] or '—'} | {r['mode']} | {_f(r.get('speedup'), '.2f')}{'x' if r.get('speedup') else ''} "
            f"| {_f(r.get('speedup_vs_eager'), '.2f')}{'x' if r.get('speedup_vs_eager') else ''} "
            f"| {_f(r.get('speedup_cpu'), '.2f')}{'x' if r.get('speedup_cpu') else ''} | {_f(r.get('time_s'), '.2f')} "
            f"| {_f(r.get('first_call_s'), '.1f')} | {psnr} | {_f(r.get('ssim'), '.4f')} | {computed} | {'; '.join(n.replace('|', '/') for n in notes) or ''} |"
        )
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    meta, rows = results.get("meta", {}), results["rows"]
    fid, spd = meta.get("fidelity_model", {}), meta.get("speed_model", {})
    lines = ["# mixcache bench", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    facts = []
    if meta.get("started_utc"):
        facts.append(f"started {meta['started_utc']} UTC")
    if meta.get("wall_s") is not None:
        facts.append(f"wall time {meta['wall_s'] / 60:.1f} min")
    if meta.get("threads"):
        facts.append(f"{meta['threads']} torch thread(s) on {meta.get('cpu_count')} CPU(s)")
    if meta.get("load_average_start"):
        facts.append(f"load average {meta['load_average_start'][0]} at start, {(meta.get('load_average_end') or ['?'])[0]} at end")
    vers = meta.get("versions") or {}
    if vers:
        facts.append(", ".join(f"{k} {v}" for k, v in vers.items() if v))
    if facts:
        lines += ["; ".join(facts) + ".", ""]
    if fid:
        samples = fid.get("samples", [])
        lines.append(f"- Fidelity: shipped tiny model ({fid.get('tokens')} tokens, {fid.get('transformer', {}).get('num_layers')} blocks), "
                     f"{len(samples)} generation(s) ({len({s['prompt'] for s in samples})} prompt(s) x "
                     f"{len({s['seed'] for s in samples})} seed(s)), {fid.get('steps')} steps, CFG {fid.get('guidance_scale')}; "
                     "PSNR/SSIM against the uncached eager output of the same prompt and seed (PSNR pooled over all samples, "
                     "min = worst sample).")
    if spd:
        t = spd.get("transformer", {})
        lines.append(f"- Speed: random-weight WanTransformer3DModel, {t.get('num_layers')} blocks, dim "
                     f"{t.get('num_attention_heads', 0) * t.get('attention_head_dim', 0)}, {spd.get('tokens')} tokens, "
                     f"{spd.get('steps')} steps x 2 CFG calls, in diffusers.WanPipeline; median of {meta.get('repeats')} interleaved "
                     "round(s) after one compile/first generation per row and one untimed round of all rows.")
    lines.append("- speedup: against the uncached baseline of the row's mode measured in the same rounds (eager rows: "
                 "the eager pipeline; compiled rows: plain `torch.compile` (inductor)); vs eager: against the eager pipeline. "
                 "CPU-time speedup: the same ratio from the process CPU time of the same timed calls (insensitive to other "
                 "processes holding the cores). computed: fraction of transformer FLOPs computed (mixcache session "
                 "statistics, fidelity model / speed model).")
    lines += ["", markdown_table(rows), ""]
    skipped = results.get("skipped") or []
    if skipped:
        lines += ["Not run:", ""] + [f"- `{s['method']}`: {s['reason']}" for s in skipped] + [""]
    if meta.get("warning"):
        lines += [f"**Warning:** {meta['warning']}", ""]
    summaries = [(r["id"], r["mode"], r["session_summary"]) for r in rows if r.get("session_summary")]
    if summaries:
        lines += ["## Session summaries (fidelity runs, all samples)", ""]
        for method, mode, text in summaries:
            lines += [f"`{method}` ({mode}):", "", "```", text, "```", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from ..progress import set_quiet
    from .pareto import plot_pareto

    set_quiet(cfg.quiet)
    results = run(cfg)
    out = Path(cfg.out)
    write_json(results, out / "bench.json")
    write_markdown(results, out / "bench.md")
    plot_pareto(results["rows"], out / "pareto.png", title=_plot_title(results))
    print(markdown_table(results["rows"]))
    failed = [r for r in results["rows"] if r["status"] != "ok"]
    print(f"\n{len(results['rows'])} rows ({len(failed)} failed), wall {results['meta']['wall_s']:.0f} s; "
          f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'pareto.png'}")
    return 0


def _plot_title(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    spd = meta.get("speed_model", {})
    return (f"speedup (speed model: {spd.get('transformer', {}).get('num_layers')} blocks, {spd.get('tokens')} tokens) "
            f"vs PSNR (shipped model), {meta.get('steps')} steps")


if __name__ == "__main__":
    sys.exit(main())
