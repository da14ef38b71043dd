"""Score ways to fill skipped steps (``skip_fill_sim.Fill``) on fixed schedules, or hill-climb.

Usage (1 thread, one process at a time):
  PYTHONPATH=. python tools/skip_fill_eval.py grid --out docs/experiments/skip_fill_grid.json
  PYTHONPATH=. python tools/skip_fill_eval.py grid --fills v:t:0.5,x0:logsigma:0.25
  PYTHONPATH=. python tools/skip_fill_eval.py climb --model deep --fills v:t:default,x0:t:0.5 --sets cal,held,wide

A fill is written ``quantity:coord:damping[:diff_damping[:at[:correct[:x0]]]]`` (``inf`` = hold, ``-`` = unset,
``default`` = the model's shipped damping: deep 0.5, tiny 0.25). ``grid`` scores every fill on
the known best step-only schedules (deep 6 and 7 steps, tiny 7 steps) on the calibration and
the held-out prompts of ``cfg_schedule_search`` (mean PSNR dB against the uncached video).
``climb`` runs ``cfg_schedule_search.Search``'s first-improvement hill climb of the computed
steps' positions on the calibration prompts with each fill (from ``--start``, default the known
best schedule: deep 6 steps, tiny 7), then scores start and found schedules on the other sets
(``--sets``; ``wide`` = the frontier's 6 held-out prompts x 2 seeds, ``fresh`` = the same
prompts with seeds 2000, 2001). ``score`` scores given (fill, schedule) pairs per sample.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cfg_schedule_search import CALIBRATION, HELD_OUT, Search  # noqa: E402
from cfg_schedule_sim import make  # noqa: E402
from skip_fill_sim import Fill, FillSimulator  # noqa: E402

from mixcache_compile.eval.frontier import EVAL_PROMPTS, EVAL_SEEDS  # noqa: E402

# ``wide``: the frontier's held-out set (6 prompts x 2 seeds, including HELD_OUT's two): two
# prompts decide +-1 dB between schedules at 6-7 computed steps, twelve samples less so.
SETS = {"cal": CALIBRATION, "held": HELD_OUT, "wide": [(p, s) for p in EVAL_PROMPTS for s in EVAL_SEEDS],
        # ``fresh``: the same prompts with seeds no search or selection here ever looked at
        "fresh": [(p, s) for p in EVAL_PROMPTS for s in (2000, 2001)]}

SHIPPED_DAMPING = {"deep": 0.5, "tiny": 0.25}
SCHEDULES = {  # the best step-only schedules of docs/experiments/cfg_half_steps.md
    "deep": {"6F": (0, 23, 32, 41, 45, 48), "7F": (0, 23, 32, 41, 45, 48, 49)},
    "tiny": {"7F": (0, 18, 30, 37, 43, 46, 48)},
}


def default_fills() -> list[str]:
    fills = ["v:t:default"]
    for q, coords in (("v", ("t", "logsigma", "index")), ("x0", ("t", "logsigma", "index")), ("noise", ("t", "logsigma"))):
        fills += [f"{q}:{c}:{d}" for c in coords for d in ("0", "0.25", "0.5", "1")]
    fills += ["v:t:inf", "x0:t:inf", "v:sigma:0.5"]
    fills += [f"v:t:{d}:inf" for d in ("0", "0.25", "0.5")] + [f"x0:t:{d}:inf" for d in ("0", "0.25", "0.5")]
    fills += [f"v:t:{d}:-:mid" for d in ("0", "0.25", "0.5", "1")] + [f"x0:t:{d}:-:mid" for d in ("0", "0.5")]
    return fills


def parse_fill(text: str, model: str) -> Fill:
    parts = text.split(":")
    parts += ["-"] * (7 - len(parts))

    def number(p: str) -> float | None:
        if p == "-":
            return None
        if p == "default":
            return SHIPPED_DAMPING[model]
        return math.inf if p == "inf" else float(p)

    return Fill(quantity=parts[0], coord=parts[1], damping=number(parts[2]), diff_damping=number(parts[3]),
                at="start" if parts[4] == "-" else parts[4], correct=0.0 if parts[5] == "-" else float(parts[5]),
                keep_x0=parts[6] == "x0")


def damping_of(model: str) -> float:
    return SHIPPED_DAMPING[model]


def grid(fills: list[str], models: list[str], sets: list[str]) -> list[dict]:
    rows: list[dict] = []
    for model in models:
        sims = {name: FillSimulator(model, SETS[name], damping=damping_of(model)) for name in sets}
        for text in fills:
            fill = parse_fill(text, model)
            row = {"model": model, "fill": text}
            for name, positions in SCHEDULES[model].items():
                for which, sim in sims.items():
                    sim.fill = fill
                    row[f"{name}_{which}"] = sim.score(make(sim.steps, positions))[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def climb(model: str, fills: list[str], start: tuple[int, ...], sets: list[str]) -> list[dict]:
    """Per fill: climb on the calibration prompts from ``start``; score start and found on ``sets``."""
    sim = FillSimulator(model, CALIBRATION, damping=damping_of(model))
    others = {name: FillSimulator(model, SETS[name], damping=damping_of(model)) for name in sets if name != "cal"}
    rows = []
    for text in fills:
        sim.fill = parse_fill(text, model)
        search = Search(sim, "full", log=False)
        best, fulls, _ = search.climb(start, ())
        row: dict = {"model": model, "fill": text, "start": list(start), "start_cal": search.score(start, ()),
                     "found": list(fulls), "found_cal": best, "evaluations": len(search.seen)}
        for name, other in others.items():
            other.fill = sim.fill
            row[f"start_{name}"] = other.score(make(50, start))[0]
            row[f"found_{name}"] = other.score(make(50, fulls))[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def score(model: str, fills: list[str], schedules: list[tuple[int, ...]], sets: list[str]) -> list[dict]:
    """Every (fill, schedule) pair on every set: mean and per-sample PSNR."""
    rows = []
    for name in sets:
        sim = FillSimulator(model, SETS[name], damping=damping_of(model))
        for text in fills:
            sim.fill = parse_fill(text, model)
            for positions in schedules:
                mean, per = sim.score(make(sim.steps, positions))
                row = {"model": model, "set": name, "fill": text, "schedule": list(positions), "psnr": mean, "per_sample": per}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("grid", "climb", "score"))
    ap.add_argument("--schedules", default="", help="score: schedules (computed steps) separated by ';'")
    ap.add_argument("--fills", default="", help="comma-separated fills (grid; default: the standard list)")
    ap.add_argument("--models", default="deep,tiny")
    ap.add_argument("--model", default="deep")
    ap.add_argument("--sets", default="cal,held", help="prompt sets scored: cal, held, wide")
    ap.add_argument("--start", default="", help="climb: comma-separated computed steps (default: the known best)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    if args.mode == "grid":
        fills = args.fills.split(",") if args.fills else default_fills()
        result: object = grid(fills, args.models.split(","), args.sets.split(","))
    elif args.mode == "score":
        schedules = [tuple(int(p) for p in sch.split(",")) for sch in args.schedules.split(";")]
        result = score(args.model, args.fills.split(","), schedules, args.sets.split(","))
    else:
        start = tuple(int(p) for p in args.start.split(",")) if args.start else min(SCHEDULES[args.model].values(), key=len)
        result = climb(args.model, args.fills.split(",") if args.fills else ["v:t:default"], start, args.sets.split(","))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
