"""The runner end to end in --quick mode, restricted to three methods (one of which fails) on
the shipped model and a two-block speed model, eager only."""

from __future__ import annotations

import json
import math

import pytest

from mixcache_compile.eval import bench


def test_quick_run_writes_json_markdown_and_plot(tmp_path):
    out = tmp_path / "bench"
    code = bench.main([
        "--quick", "--no-compile", "--out", str(out), "--steps", "4", "--repeats", "1",
        "--methods", "mixcache:static(every=2),diffusers:fastercache",
        "--bench-layers", "2", "--bench-size", "8",
    ])
    assert code == 0
    results = json.loads((out / "bench.json").read_text())
    rows = {(r["id"], r["mode"]): r for r in results["rows"]}
    assert set(rows) == {("baseline:uncached", "eager"), ("mixcache:static(every=2)", "eager"), ("diffusers:fastercache", "eager")}

    baseline = rows[("baseline:uncached", "eager")]
    assert math.isinf(baseline["psnr"]) and baseline["ssim"] == 1.0
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    assert len(ok) == 2
    for r in ok:  # each speedup is the ratio of the timings the same row reports
        assert r["speedup"] == pytest.approx(r["baseline_time_s"] / r["time_s"])
    static = rows[("mixcache:static(every=2)", "eager")]
    assert 0 < static["computed_fraction"] < 1 and math.isfinite(static["psnr"])

    failed = rows[("diffusers:fastercache", "eager")]
    assert failed["status"] == "failed" and failed["speedup"] is None
    assert failed["error"].startswith("IndexError") and "faster_cache.py" in failed["error_where"]

    md = (out / "bench.md").read_text()
    assert "IndexError" in md and "mixcache:static(every=2)" in md
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert results["meta"]["steps"] == 4 and results["meta"]["command"].startswith("mixcache bench --quick")
