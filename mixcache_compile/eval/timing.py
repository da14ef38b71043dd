"""Timing helpers: interleaved A/B repetitions and medians, so ratios survive a noisy machine."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable

# {function name: {"wall": [seconds per round], "cpu": [...]}}
Times = dict[str, dict[str, list[float]]]
METRICS = ("wall", "cpu")


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, run round-robin ``repeats`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, seed: int = 0) -> Times:
    """Wall and process CPU time of every function in each of ``repeats`` rounds.

    Note [CPU time under load]: on a shared machine other jobs take time slices from ours,
    which stretches wall time by a factor that drifts during a run. The process's CPU time (one
    torch thread) counts only the time our work ran, so its ratios are the steadier ones when
    the load exceeds the cores; both are recorded.

    Each round runs the functions in a new random order (seeded): with a fixed order a
    function always follows the same neighbour, and whatever that one leaves behind (caches,
    allocator state) would count against it every time."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Times = {name: {m: [] for m in METRICS} for name in fns}
    order, rng = list(fns), random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def copy_keys(method: str, copies: int) -> list[str]:
    """Keys of ``method``'s model copies in a ``Times`` dict: ``method#0`` ... (Note [model copies])."""
    return [f"{method}#{k}" for k in range(copies)]


def pooled_median(times: Times, method: str, copies: int) -> dict[str, float]:
    """Median over every round of every copy of ``method``.

    Note [model copies]: ``torch.compile`` copies of one model differed by 7-21% per
    generation in one process on this machine (slowest / fastest plain copy, 2-8 copies, eight
    runs), and a copy tends to stay fast or slow for the run (same kernels, same page faults;
    the cause was not found). One copy per method measures its copy's luck as much as the
    method, so benchmarks give every method several copies."""
    return {m: statistics.median(x for key in copy_keys(method, copies) for x in times[key][m]) for m in METRICS}


def paired_ratio(times: Times, base: str, method: str, copies: int) -> dict[str, float]:
    """Speed of ``method`` relative to ``base``: median over rounds of (base's mean time over its
    copies / method's mean time over its copies) within the round.

    Note [paired rounds]: the machine's speed drifts during a run (another process starts, an
    SMT sibling gets busy): in one run here every function's generation time rose from ~0.9 s
    to ~1.15 s between the first and the last of eight rounds. A ratio of per-function medians
    over the whole run keeps that drift as noise (+-5% at eight rounds); a ratio formed inside
    each round, where both sides ran seconds apart in random order, cancels it, and the median
    over rounds drops the rounds an outside burst hit."""
    base_keys, method_keys = copy_keys(base, copies), copy_keys(method, copies)
    rounds = len(times[base_keys[0]]["wall"])
    if any(len(times[key]["wall"]) != rounds for key in base_keys + method_keys):
        raise ValueError(f"paired_ratio needs the same number of rounds for every copy of {base!r} and {method!r}")
    return {
        m: statistics.median(
            statistics.fmean(times[key][m][r] for key in base_keys)
            / statistics.fmean(times[key][m][r] for key in method_keys)
            for r in range(rounds)
        )
        for m in METRICS
    }
