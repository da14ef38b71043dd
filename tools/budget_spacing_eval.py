"""Where the mixcache budget puts its computed steps, and what a weight on its indicator changes
(issue #13; docs/experiments/block_fill.md, "A per-step sensitivity").

On the shipped models the budget prices only whole-step reuse (the calibrations price cfg,
block and attention out), and its indicator (the change of the timestep modulation) is the
same for every prompt. So its schedule is a function of the threshold and the indicator
sequence, and can be generated offline (``schedule``; equal to the session's, tested) and
scored in the schedule simulator.

  indicators   one generation with threshold 0: the weighted indicator of every step, and the
               calibration's coefficients (JSON)
  sensitivity  the final-output error per unit error of one step's reused output, per step
               (``eval/calibrate.py``'s ``Perturber`` in "reuse" mode)
  score        for each weight family parameter ``c``, the schedules of a threshold grid, one
               per computed-step count, scored on a prompt set of ``block_fill_sim.SETS``

Usage (1 thread): ``PYTHONPATH=. python tools/budget_spacing_eval.py indicators --out out/x.json``, then
``... score --indicators out/x.json --model deep --set cal --c 0,0.1 --cap 0.5``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

Weight = Callable[[int, int], float]


def flat(i: int, total: int) -> float:
    return 1.0


def progress_weight(c: float, cap: float | None) -> Weight:
    """``(c + p) / (c + cap)`` at progress ``p = i / (T - 1)``; capped at 1 unless ``cap`` is None
    (then ``cap = 0.5`` and uncapped: early steps cheaper, late ones dearer)."""
    if cap is None:
        return lambda i, total: (c + i / (total - 1)) / (c + 0.5)
    return lambda i, total: min(1.0, (c + i / (total - 1)) / (c + cap))


def schedule(x: Sequence[float], k: dict[str, float], threshold: float, weight: Weight = flat,
             warm: int = 1) -> list[int]:
    """The computed steps of the budget's step-only rule for the weighted indicators ``x``
    (``x[0]`` unused): ``policies/budget.py``'s own ``choose`` and ``advance`` with step reuse
    the only candidate, extrapolated once two steps were computed (Note [error budget])."""
    from mixcache_compile.policies import budget

    total = len(x)
    computed, stale = list(range(warm)), {q: 0.0 for q in budget.QUANTITIES}
    for i in range(warm, total):
        xi = x[i] * weight(i, total)
        choice = budget.choose([frozenset({"step"})], xi, stale, k, {}, threshold, extrapolated=len(computed) >= 2)
        if not choice.reuse:
            computed.append(i)
        stale = budget.advance(stale, choice.reuse, xi)
    return computed


def indicators(name: str, steps: int = 50, prompt: str = "red circle moving right", seed: int = 2000) -> dict[str, Any]:
    import mixcache_compile
    from mixcache_compile.zoo import default_call_kwargs, load_pipeline

    pipe = load_pipeline(name=name)
    pipe.set_progress_bar_config(disable=True)
    session = mixcache_compile.enable(pipe, policy="mixcache", engine="eager", threshold=0.0)
    with torch.no_grad():
        pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed),
             **default_call_kwargs(num_inference_steps=steps, guidance_scale=5.0))
    policy = session.policy
    return {"x": [x for (_, x, _, _) in policy.log], "k": policy.k}


def sensitivity(name: str, prompt: str, seed: int, at_steps: Sequence[int], steps: int = 50) -> list[tuple[int, float]]:
    from mixcache_compile.eval.calibrate import Perturber, _pipeline_runner, _rel_l1
    from mixcache_compile.zoo import default_call_kwargs, load_pipeline

    pipe = load_pipeline(name=name)
    pipe.set_progress_bar_config(disable=True)
    run = _pipeline_runner(pipe, dict(prompt=prompt, **default_call_kwargs(num_inference_steps=steps, guidance_scale=5.0)))
    baseline = run(seed)
    rows = []
    for step in at_steps:
        perturber = Perturber(pipe.transformer, "step", step, 0.1, seed, 1, 1, "reuse")
        with perturber.installed():
            moved = run(seed)
        error = sum(perturber.errors) / len(perturber.errors)
        rows.append((step, _rel_l1(moved, baseline) / error))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    ind = sub.add_parser("indicators")
    ind.add_argument("--out", type=Path, required=True)
    sen = sub.add_parser("sensitivity")
    sen.add_argument("--model", default="deep")
    sen.add_argument("--prompt", default="red circle moving left")
    sen.add_argument("--seed", type=int, default=7)
    sen.add_argument("--steps", default="1,3,6,10,15,20,25,30,35,40,44,47,49")
    sc = sub.add_parser("score")
    sc.add_argument("--indicators", type=Path, required=True)
    sc.add_argument("--model", default="deep")
    sc.add_argument("--set", default="cal")
    sc.add_argument("--c", default="0,0.1", help="weight parameters; 0 = the flat (current) rule")
    sc.add_argument("--cap", type=float, default=None, help="cap the weight at 1 from progress CAP (default: uncapped)")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.mode == "indicators":
        a.out.write_text(json.dumps({name: indicators(name) for name in ("deep", "tiny")}))
        return
    if a.mode == "sensitivity":
        print(sensitivity(a.model, a.prompt, a.seed, [int(s) for s in a.steps.split(",")]))
        return
    from block_fill_sim import DAMPING, SETS
    from cfg_schedule_sim import Simulator, make

    data = json.loads(a.indicators.read_text())[a.model]
    sim = Simulator(a.model, SETS[a.set], damping=DAMPING[a.model])
    thresholds = [round(0.02 + 0.005 * k, 3) for k in range(60)]
    for c in (float(v) for v in a.c.split(",")):
        weight = flat if c <= 0 else progress_weight(c, a.cap)
        by_count: dict[int, tuple[float, list[int], float]] = {}
        for t in thresholds:
            computed = schedule(data["x"], data["k"], t, weight)
            if 6 <= len(computed) <= 13 and len(computed) not in by_count:
                by_count[len(computed)] = (t, computed, sim.score(make(len(data["x"]), computed))[0])
        for n, (t, computed, db) in sorted(by_count.items()):
            print(f"{a.model} {a.set} c={c} steps={n} threshold={t} {db:.2f} dB {computed}", flush=True)


if __name__ == "__main__":
    main()
