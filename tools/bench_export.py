"""Benchmark of exported engines on the shipped model (mixcache_compile.zoo).

1. Cold start of a second process: one generation in a fresh process that loads saved
   inductor artifacts, against one that compiles again (``enable(engine="inductor")``). Both
   start with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR in a temporary directory).
2. The onnxruntime engine with and without caching: the export's default policy (mixcache,
   the shipped model's calibration, as ``enable(pipe)``) and static every=2 against none, on a
   held-out prompt: interleaved (each repetition rotates which runs first), medians, and each
   video's PSNR against the uncached engine's.

    python tools/bench_export.py [--steps 50] [--repeats 3] [--out out/bench-export]

Prints a Markdown table. Threads: 1 (torch and each onnxruntime session).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import torch
torch.set_num_threads(1)
from mixcache_compile.zoo import default_call_kwargs, load_pipeline
mode, directory, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
pipe = load_pipeline()
pipe.set_progress_bar_config(disable=True)
if mode == "compile":
    import mixcache_compile
    mixcache_compile.enable(pipe, policy="static", engine="inductor", every=2)
else:
    from mixcache_compile.export import ExportedTransformer
    ExportedTransformer(directory).install(pipe)
kwargs = {"prompt": "red circle moving left", **default_call_kwargs(num_inference_steps=steps)}
with torch.no_grad():
    pipe(generator=torch.Generator().manual_seed(0), **kwargs)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def child(mode: str, directory: Path, steps: int) -> float:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(directory), str(steps)], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


HELD_OUT = ("blue square moving down", 1000)  # not a calibration prompt (eval/budget_fit.py)


def interleaved_seconds(pipes: dict[str, Any], kwargs: dict, repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of one generation per pipeline, the pipelines interleaved (repetition r
    starts with the r-th one, so load changes hit all alike), and each one's video. A first,
    untimed generation per pipeline loads its onnxruntime sessions."""
    import torch

    def generate(pipe: Any) -> Any:
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(HELD_OUT[1]), **kwargs).frames

    videos = {name: generate(pipe) for name, pipe in pipes.items()}
    names = list(pipes)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            generate(pipes[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, videos


def cold_start_rows(args: argparse.Namespace, example: dict) -> list[tuple[str, str, str]]:
    """1. Cold start with saved inductor artifacts vs compiling again."""
    from mixcache_compile.export import export
    from mixcache_compile.zoo import load_pipeline

    artifacts = args.out / "inductor"
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        report = export(load_pipeline(), example, artifacts, format="inductor", variants=(), policy="static", every=2)
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    compile_s = child("compile", artifacts, args.steps)
    load_s = child("load", artifacts, args.steps)
    return [("cold start, second process: compile again (inductor)", f"{compile_s:.1f} s", ""),
            ("cold start, second process: load saved artifacts", f"{load_s:.1f} s", f"{compile_s / load_s:.1f}x faster"),
            ("(writing the artifacts, once)", f"{report.seconds:.1f} s", f"{report.graphs_exported} compiled graphs")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-cold-start", action="store_true", help="only the onnxruntime part")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench-export")
    args = p.parse_args(argv)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from mixcache_compile.export import ExportedTransformer, export
    from mixcache_compile.zoo import default_call_kwargs, load_pipeline

    example = {"prompt": "red circle moving left", **default_call_kwargs(num_inference_steps=1)}
    rows = []

    if not args.no_cold_start:
        rows += cold_start_rows(args, example)

    # 2. onnxruntime: the export's default policy and static every=2 against none
    from mixcache_compile.eval.metrics import psnr

    onnx_dir = args.out / "onnx"
    report = export(load_pipeline(), example, onnx_dir)  # records DEFAULT_POLICY, as `mixcache export`
    held_out = {"prompt": HELD_OUT[0], **default_call_kwargs(num_inference_steps=args.steps)}
    policies: dict[str, tuple[str | None, dict]] = {
        "none": ("none", {}), "static every=2": ("static", {"every": 2}),
        "the export's default (mixcache, shipped calibration)": (None, {}),  # the manifest's policy
    }
    pipes, sessions = {}, {}
    for name, (policy, options) in policies.items():
        pipe = load_pipeline()
        pipe.set_progress_bar_config(disable=True)
        transformer = ExportedTransformer(onnx_dir, policy=policy, **options).install(pipe)
        pipes[name], sessions[name] = pipe, transformer.session
    seconds, videos = interleaved_seconds(pipes, held_out, args.repeats)
    for name in policies:
        stats = sessions[name].stats()
        # stats() counts every generation of the session alike: its fraction is the per-generation one
        note = "computed 100%" if name == "none" else (
            f"{seconds['none'] / seconds[name]:.2f}x faster, computed {100 * stats['computed_fraction']:.0f}%, "
            f"PSNR {psnr(videos[name], videos['none']):.1f} dB vs none")
        rows.append((f"onnxruntime, policy {name} ({args.steps} steps)", f"{seconds[name]:.2f} s", note))
    rows.append(("(ONNX export, once)", f"{report.seconds:.1f} s", f"{report.graphs_exported} graphs, {report.files} files"))

    print("| measurement | time | ratio / note |\n|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
