"""Search step-only and mixed FULL/HALF schedules at equal cost with ``cfg_schedule_sim``.

Usage: PYTHONPATH=. python tools/cfg_schedule_search.py --model deep --costs 12,14 --out docs/experiments/cfgx_deep.json

For each cost ``C`` (half-steps: F = 2, H = 1):
  * step-only: ``C / 2`` full steps, hill-climbed (first improvement) over their positions,
    moves = shift one computed step by +-1, 2, 4, 8. The first count starts from ``--start``;
    the others from the neighbouring count's best plus the best insertion / minus the best
    removal of one step;
  * mixed: ``(C / 2 - k)`` full + ``2k`` half steps for k in ``--splits``: start from the best
    step-only schedule with ``C / 2 - k`` full steps, insert ``2k`` half steps greedily (every
    free position tried for each), then hill-climb with the same shifts plus swapping the
    positions of a full and a half step.
Step 0 stays full (mixcache's warm-up). Scores are mean PSNR over the simulator's samples
(calibration prompts by default). The best schedules are then scored on the held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cfg_schedule_sim import Simulator, make  # noqa: E402

CALIBRATION = [("red circle moving left", 7), ("yellow circle moving down", 7)]
HELD_OUT = [("blue square moving down", 1000), ("green circle moving up", 1000)]
SHIFTS = (1, -1, 2, -2, 4, -4, 8, -8)


class Search:
    def __init__(self, sim: Simulator, skip_mode: str, log: bool = True) -> None:
        self.sim, self.skip_mode, self.log = sim, skip_mode, log
        self.seen: dict[str, float] = {}

    def score(self, fulls: tuple[int, ...], halves: tuple[int, ...]) -> float:
        schedule = make(self.sim.steps, fulls, halves)
        if schedule not in self.seen:
            self.seen[schedule] = self.sim.score(schedule, self.skip_mode)[0]
        return self.seen[schedule]

    def climb(self, fulls: tuple[int, ...], halves: tuple[int, ...], moves: int = 200) -> tuple[float, tuple, tuple]:
        """First-improvement hill climb (scores memoised) until no neighbour is better."""
        best = self.score(fulls, halves)
        for _ in range(moves):
            for nf, nh in self.neighbours(fulls, halves):
                s = self.score(nf, nh)
                if s > best + 1e-9:
                    best, fulls, halves = s, nf, nh
                    break
            else:
                break
            if self.log:
                print(f"    {best:6.2f} F={list(fulls)} H={list(halves)} (evals {len(self.seen)}, calls {self.sim.calls_run})", flush=True)
        return best, fulls, halves

    def neighbours(self, fulls: tuple[int, ...], halves: tuple[int, ...]):
        """Shifts of one computed step, and swaps of a full and a half step's positions."""
        steps = self.sim.steps
        for p in [*fulls[1:], *halves]:
            for d in SHIFTS:
                q = p + d
                if not 0 < q < steps or q in fulls or q in halves:
                    continue
                if p in fulls:
                    yield tuple(sorted((set(fulls) - {p}) | {q})), halves
                else:
                    yield fulls, tuple(sorted((set(halves) - {p}) | {q}))
        for a in fulls[1:]:
            for b in halves:
                yield tuple(sorted((set(fulls) - {a}) | {b})), tuple(sorted((set(halves) - {b}) | {a}))

    def insert(self, fulls: tuple[int, ...], halves: tuple[int, ...], kind: str) -> tuple[tuple, tuple]:
        """The best position for one more full (``kind="F"``) or half step, every free one tried."""
        best = None
        for q in range(1, self.sim.steps):
            if q in fulls or q in halves:
                continue
            nf, nh = (tuple(sorted({*fulls, q})), halves) if kind == "F" else (fulls, tuple(sorted({*halves, q})))
            s = self.score(nf, nh)
            if best is None or s > best[0]:
                best = (s, nf, nh)
        assert best is not None
        return best[1], best[2]

    def remove(self, fulls: tuple[int, ...]) -> tuple[int, ...]:
        """The best full step schedule with one computed step fewer (every removal tried)."""
        options = [tuple(x for x in fulls if x != p) for p in fulls[1:]]
        return max(options, key=lambda f: self.score(f, ()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--costs", default="12,14")
    ap.add_argument("--damping", type=float, default=None, help="default: the shipped calibration's (deep 0.5, tiny 0.25)")
    ap.add_argument("--skip-mode", default="full", choices=("full", "fresh"))
    ap.add_argument("--splits", default="1,2", help="k values: (C/2 - k) full + 2k half")
    ap.add_argument("--start", default="", help="comma-separated full positions to start the step-only search at the first cost")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    damping = args.damping if args.damping is not None else (0.5 if args.model == "deep" else 0.25)
    t0 = time.time()
    sim = Simulator(args.model, CALIBRATION, damping=damping)
    search = Search(sim, args.skip_mode)
    costs = [int(c) for c in args.costs.split(",")]
    splits = [int(x) for x in args.splits.split(",")]
    n0 = costs[0] // 2
    start = tuple(int(p) for p in args.start.split(",")) if args.start else None
    if start is None or len(start) != n0:
        start = tuple(sorted({0, *[round(49 - 29 * (1 - (j / (n0 - 1)) ** 0.7)) for j in range(1, n0)]}))
    print(f"step-only {n0} from {start}", flush=True)
    step_only = {n0: search.climb(start, ())}
    need = sorted({c // 2 - k for c in costs for k in [0, *splits]})
    for n in [m for m in need if m > n0]:  # grow: best insertion, then climb
        f = search.insert(step_only[n - 1][1], (), "F")[0]
        print(f"step-only {n} from {f}", flush=True)
        step_only[n] = search.climb(f, ())
    for n in sorted([m for m in need if m < n0], reverse=True):  # shrink: best removal, then climb
        f = search.remove(step_only[n + 1][1])
        print(f"step-only {n} from {f}", flush=True)
        step_only[n] = search.climb(f, ())
    results = []
    for cost in costs:
        best = step_only[cost // 2]
        results.append({"cost": cost, "kind": f"{cost // 2}F", "psnr": best[0], "F": best[1], "H": best[2]})
        print(f"cost {cost}: step-only {best[0]:.2f} F={best[1]}  ({time.time() - t0:.0f}s)", flush=True)
        for k in ([0] if cost % 2 else []) + splits:  # an odd cost: (C // 2 - k) full + (2k + 1) half
            f, h = step_only[cost // 2 - k][1], ()
            for _ in range(cost - 2 * len(f)):
                f, h = search.insert(f, h, "H")
            print(f"cost {cost}: mixed {len(f)}F+{len(h)}H from F={f} H={h} ({search.score(f, h):.2f})", flush=True)
            mixed = search.climb(f, h)
            results.append({"cost": cost, "kind": f"{len(mixed[1])}F+{len(mixed[2])}H", "psnr": mixed[0], "F": mixed[1], "H": mixed[2]})
            print(f"  mixed {mixed[0]:.2f} F={mixed[1]} H={mixed[2]}  ({time.time() - t0:.0f}s)", flush=True)
    # held-out scores and the other modes, at the found schedules
    held = Simulator(args.model, HELD_OUT, damping=damping)
    for r in results:
        schedule = make(50, r["F"], r["H"])
        r["held_out"] = held.score(schedule, args.skip_mode)[0]
        other = "fresh" if args.skip_mode == "full" else "full"
        r[f"calibration_{other}"] = sim.score(schedule, other)[0]
        if r["H"]:
            r["calibration_stale_d"] = sim.score(schedule, args.skip_mode, "stale")[0]
        print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "damping": damping, "skip_mode": args.skip_mode,
                                              "results": results}, indent=1))
    print(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
