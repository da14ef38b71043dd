"""The benchmark estimators of eval/timing.py on recorded times, where the right answer is known."""

from __future__ import annotations

import pytest

from mixcache_compile.eval.timing import interleaved_times, paired_ratio, pooled_median


def _times(rounds: list[float], scale: float) -> dict[str, list[float]]:
    return {"wall": [r * scale for r in rounds], "cpu": [r * scale for r in rounds]}


def test_paired_ratio_cancels_drift_that_medians_keep() -> None:
    # The machine slows down during the run (drift 1.0 -> 1.5); the method is 10% slower than
    # base in every round, and the in-round ratio says exactly that.
    drift = [1.0, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.5]
    times = {"base#0": _times(drift, 1.0), "base#1": _times(drift, 1.02), "m#0": _times(drift, 1.1), "m#1": _times(drift, 1.122)}
    ratio = paired_ratio(times, "base", "m", copies=2)
    assert ratio["wall"] == pytest.approx(1.01 / 1.111)
    assert ratio["cpu"] == pytest.approx(1.01 / 1.111)
    # Medians over the whole run, when the drift hit base harder (it ran late, the method
    # early), call the slower method faster.
    skewed = {"base#0": _times(drift[4:], 1.0), "m#0": _times(drift[:4], 1.1)}
    assert pooled_median(skewed, "base", 1)["wall"] / pooled_median(skewed, "m", 1)["wall"] > 1.1


def test_paired_ratio_drops_a_burst_round() -> None:
    base = [1.0] * 7
    method = [1.25] * 7
    method[3] = 5.0  # an outside burst hit the method in one round
    times = {"a#0": {"wall": base, "cpu": base}, "b#0": {"wall": method, "cpu": method}}
    assert paired_ratio(times, "a", "b", copies=1)["wall"] == pytest.approx(0.8)


def test_paired_ratio_refuses_uneven_rounds() -> None:
    times = {"a#0": _times([1.0, 1.0], 1.0), "b#0": _times([1.0], 1.0)}
    with pytest.raises(ValueError, match="same number of rounds"):
        paired_ratio(times, "a", "b", copies=1)


def test_pooled_median_pools_every_copy() -> None:
    times = {"m#0": _times([1.0, 1.0, 1.0], 1.0), "m#1": _times([3.0, 3.0, 3.0], 1.0), "m#2": _times([2.0], 1.0)}
    assert pooled_median(times, "m", 2)["wall"] == 2.0  # median of 1,1,1,3,3,3; copy 2 not counted
    assert pooled_median(times, "m", 3)["cpu"] == 2.0


def test_interleaved_times_runs_every_function_each_round_in_changing_order() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times = interleaved_times(fns, repeats=6, warmup=1, seed=3)
    assert calls[:4] == list("abcd")  # warm-up round in the given order
    rounds = [calls[4 + 4 * r: 8 + 4 * r] for r in range(6)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
    assert all(len(t["wall"]) == 6 and len(t["cpu"]) == 6 and min(t["wall"]) >= 0 for t in times.values())
