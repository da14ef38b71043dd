"""Peak memory per policy vs uncached: each policy in a fresh process (peak RSS is per process).

Runs one 20-step separate-CFG generation of a bench-size random-weight WanTransformer3DModel
(eager engine, 1 thread) under each policy and reports the process peak RSS (ru_maxrss)
as a ratio to policy ``none``, plus the session's exact cache figures (bytes held at the end,
peak bytes, buffer allocations). Usage: ``python tools/bench_memory.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

POLICIES: dict[str, dict] = {
    "none": {},
    "static every=2": {"policy": "static", "every": 2, "warmup": 4},
    "static block:2-10": {"policy": "static", "schedule": {i: "block:2-10" for i in range(4, 19, 2)}},
    "static cfg": {"policy": "static", "schedule": {(i, "uncond"): "cfg" for i in range(4, 19, 2)}},
    "static attn:all": {"policy": "static", "schedule": {i: "attn:" + ",".join(map(str, range(12))) for i in range(4, 19, 2)}},
    "fastercache": {"policy": "fastercache"},
    "mixcache": {"policy": "mixcache"},
    "fbcache": {"policy": "fbcache"},
    "teacache": {"policy": "teacache"},
    "pab": {"policy": "pab"},
}


def child(spec: dict, steps: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT))
    from bench_backend import bench_model, generation

    from mixcache_compile import CacheSession

    torch.set_num_threads(1)
    spec = dict(spec)
    schedule = spec.pop("schedule", None)
    if schedule is not None:
        spec["schedule"] = {(int(k.split(",")[0]), k.split(",")[1]) if "," in k else int(k): v for k, v in schedule.items()}
    session = CacheSession(spec.pop("policy", "none"), **spec)
    model, latents, cond, uncond = bench_model(12)
    compiled = torch.compile(model, backend="mixcache", fullgraph=True, options={"session": session, "engine": "eager"})
    with torch.no_grad():
        generation(compiled, latents, cond, uncond, steps, session)
    stats = session.stats()
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "cache_bytes": stats["cache_bytes"],
                      "cache_peak_bytes": stats["cache_peak_bytes"], "allocations": stats["cache_allocations"],
                      "computed_fraction": stats["computed_fraction"]}))


def _encode(spec: dict) -> str:
    spec = dict(spec)
    if "schedule" in spec:
        spec["schedule"] = {(f"{k[0]},{k[1]}" if isinstance(k, tuple) else str(k)): v for k, v in spec["schedule"].items()}
    return json.dumps(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="out/bench_memory.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child), args.steps)
        return
    results = {}
    for name, spec in POLICIES.items():
        proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", _encode(spec)],
                              capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        else:
            results[name] = json.loads(lines[-1])
        print(name, results[name], flush=True)
    base = results["none"]["maxrss_kb"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("\n| policy | peak RSS / uncached | cache held at end | cache peak | buffer allocations | computed fraction |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | not run: {r['error'][:80]} | | | | |")
            continue
        print(f"| {name} | {r['maxrss_kb'] / base:.3f} | {r['cache_bytes'] / 2**20:.1f} MiB | {r['cache_peak_bytes'] / 2**20:.1f} MiB | "
              f"{r['allocations']} | {r['computed_fraction']:.3f} |")


if __name__ == "__main__":
    main()
