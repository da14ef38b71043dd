"""Benchmark of exported engines on the shipped model (mixcache_compile.zoo).

1. Cold start of a second process: one generation in a fresh process that loads saved
   inductor artifacts, against one that compiles again (``enable(engine="inductor")``). Both
   start with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR in a temporary directory).
2. The onnxruntime engine with and without caching: policy static every=2 against none.

    python tools/bench_export.py [--steps 20] [--repeats 3] [--out out/bench-export]

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


def generation_seconds(pipe, kwargs: dict, repeats: int) -> float:
    import torch

    times = []
    for _ in range(repeats + 1):  # the first run loads sessions: not timed
        start = time.perf_counter()
        with torch.no_grad():
            pipe(generator=torch.Generator().manual_seed(0), **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench-export")
    args = p.parse_args(argv)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from mixcache_compile.export import ExportedTransformer, export
    from mixcache_compile.zoo import default_call_kwargs, load_pipeline

    kwargs = {"prompt": "red circle moving left", **default_call_kwargs(num_inference_steps=args.steps)}
    example = {"prompt": "red circle moving left", **default_call_kwargs(num_inference_steps=1)}
    rows = []

    # 1. cold start with saved inductor artifacts vs compiling again
    artifacts = args.out / "inductor"
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        report = export(load_pipeline(), example, artifacts, format="inductor", variants=(), policy="static", every=2)
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    compile_s = child("compile", artifacts, args.steps)
    load_s = child("load", artifacts, args.steps)
    rows.append(("cold start, second process: compile again (inductor)", f"{compile_s:.1f} s", ""))
    rows.append(("cold start, second process: load saved artifacts", f"{load_s:.1f} s", f"{compile_s / load_s:.1f}x faster"))
    rows.append(("(writing the artifacts, once)", f"{report.seconds:.1f} s", f"{report.graphs_exported} compiled graphs"))

    # 2. onnxruntime with and without caching
    onnx_dir = args.out / "onnx"
    report = export(load_pipeline(), example, onnx_dir, policy="none")
    timings = {}
    for policy, options in (("none", {}), ("static", {"every": 2})):
        pipe = load_pipeline()
        pipe.set_progress_bar_config(disable=True)
        transformer = ExportedTransformer(onnx_dir, policy=policy, **options).install(pipe)
        timings[policy] = generation_seconds(pipe, kwargs, args.repeats)
        timings[policy + "_fraction"] = transformer.session.stats()["computed_fraction"]
    rows.append((f"onnxruntime, policy none ({args.steps} steps)", f"{timings['none']:.2f} s", "computed 100%"))
    rows.append((f"onnxruntime, policy static every=2 ({args.steps} steps)", f"{timings['static']:.2f} s",
                 f"{timings['none'] / timings['static']:.2f}x faster, computed {100 * timings['static_fraction']:.0f}%"))
    rows.append(("(ONNX export, once)", f"{report.seconds:.1f} s", f"{report.graphs_exported} graphs, {report.files} files"))

    print("| measurement | time | ratio / note |\n|---|---|---|")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
