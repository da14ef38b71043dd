"""``mixcache bench`` configuration: the command's options (``parse_args``) and the fixed
choices of the benchmark (prompts, swept knobs, the ``--quick`` selection)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..progress import add_quiet_flag

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
