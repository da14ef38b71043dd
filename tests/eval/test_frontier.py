"""mixcache frontier: the fraction-at-quality rule and its table, on hand-made rows (the
sweep itself runs 50-step generations of every method: minutes, not a unit test)."""

from __future__ import annotations

import pytest

from mixcache_compile.eval.frontier import fraction_at, fraction_at_levels, markdown, sweep


def _row(method: str, psnr: float, fraction: float) -> dict:
    return {"method": method, "knob": "k", "status": "ok", "psnr": psnr, "psnr_min": psnr - 1, "ssim": 0.9,
            "computed_fraction": fraction}


ROWS = [
    _row("mixcache", 40.0, 0.30), _row("mixcache", 33.0, 0.18), _row("mixcache", 29.0, 0.12),
    _row("teacache", 37.0, 0.33), _row("teacache", 32.5, 0.25), _row("teacache", 27.0, 0.15),
    _row("diffusers:magcache", 33.0, 0.50),
    {"method": "diffusers:pab", "knob": "k", "status": "failed", "error": "IndexError: x"},
]


def test_fraction_at_is_the_cheapest_point_reaching_the_level():
    assert fraction_at(ROWS, "mixcache", 32.0) == 0.18
    assert fraction_at(ROWS, "teacache", 28.0) == 0.25  # 27 dB at 0.15 does not reach 28
    assert fraction_at(ROWS, "teacache", 38.0) is None
    assert fraction_at(ROWS, "diffusers:pab", 10.0) is None  # failed rows never count


def test_levels_compare_with_the_best_other_method():
    levels = {lv["psnr"]: lv for lv in fraction_at_levels(ROWS)}
    assert levels[36.0]["best_other"] == "teacache" and levels[36.0]["ratio"] == pytest.approx(0.30 / 0.33)
    assert levels[32.0]["ratio"] == pytest.approx(0.18 / 0.25)
    assert levels[28.0]["mixcache"] == 0.12 and levels[28.0]["best_other_fraction"] == 0.25
    table = markdown({"rows": ROWS, "levels": fraction_at_levels(ROWS)})
    assert "| 32 dB | 0.180 | teacache (0.250) | 0.72 |" in table and "failed: IndexError" in table


def test_sweep_names_every_method():
    methods = {p.method for p in sweep(full=True)}
    assert {"mixcache", "teacache", "fbcache", "static", "fastercache", "pab", "diffusers:fbcache", "diffusers:magcache",
            "diffusers:taylorseer", "diffusers:pab", "cache-dit:dbcache"} <= methods
