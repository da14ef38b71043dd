"""The JSON / Markdown writers and the Pareto plot, on synthetic results (no model runs)."""

from __future__ import annotations

import json
import math

from mixcache_compile.eval.bench import markdown_table, write_json, write_markdown
from mixcache_compile.eval.pareto import pareto_front, plot_pareto


def _row(id_, family, mode, speedup, psnr, status="ok", error=None, **extra):
    row = {
        "id": id_, "family": family, "knob": extra.pop("knob", ""), "mode": mode,
        "baseline": "eager" if mode == "eager" else "inductor", "status": status, "error": error,
        "error_where": "x.py:1 in f" if error else None, "error_phase": "fidelity" if error else None,
        "time_s": None if speedup is None else 1.0 / speedup, "speedup": speedup,
        "speedup_vs_eager": speedup, "psnr": psnr, "psnr_min": psnr, "ssim": None if psnr is None else 0.9,
        "computed_fraction": extra.pop("computed_fraction", None), "computed_fraction_speed": None,
        "fidelity_from": "eager", "notes": [],
    }
    row.update(extra)
    return row


ROWS = [
    _row("baseline:uncached", "baseline", "eager", 1.0, math.inf),
    _row("baseline:uncached", "baseline", "compiled", 1.0, math.inf),
    _row("mixcache:static(every=2)", "mixcache", "eager", 1.8, 33.0, knob="every=2", computed_fraction=0.55),
    _row("mixcache:static(every=2)", "mixcache", "compiled", 1.7, 33.0, knob="every=2"),
    _row("diffusers:fbcache(threshold=0.05)", "diffusers", "eager", 1.2, 38.0),
    _row("diffusers:pab(spatial_attention_block_skip_range=2)", "diffusers", "eager", 1.1, 24.0),
    _row("cache-dit:dbcache(residual_diff_threshold=0.08)", "cache-dit", "eager", 1.05, 50.0),
    _row("diffusers:fastercache", "diffusers", "eager", None, None, status="failed",
         error="IndexError: tuple index out of range"),
]


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 40.0), (1.5, 35.0), (1.2, 30.0), (2.0, 20.0), (1.5, 34.0)]
    assert pareto_front(pts) == [(1.0, 40.0), (1.5, 35.0), (2.0, 20.0)]


def test_json_round_trip_keeps_infinite_psnr(tmp_path):
    results = {"meta": {"steps": 4}, "rows": ROWS, "skipped": []}
    path = write_json(results, tmp_path / "out" / "bench.json")
    back = json.loads(path.read_text())
    assert math.isinf(back["rows"][0]["psnr"])
    assert back["rows"][-1]["error"] == "IndexError: tuple index out of range"


def test_markdown_table_lists_every_row_and_the_failure_text(tmp_path):
    table = markdown_table(ROWS)
    lines = table.splitlines()
    assert lines[0].startswith("| method | knob | mode | speedup | vs eager | CPU-time speedup |")
    assert len(lines) == 2 + len(ROWS)
    assert "∞" in table and "1.80x" in table
    failed = next(line for line in lines if "fastercache" in line)
    assert "FAILED" in failed and "IndexError: tuple index out of range" in failed
    # eager rows first, then compiled; baseline first within a mode
    assert "baseline:uncached" in lines[2] and "| eager |" in lines[2]
    assert "| compiled |" in lines[-1]
    meta = {"command": "mixcache bench --quick", "wall_s": 90.0, "threads": 1, "repeats": 1,
            "fidelity_model": {"tokens": 512, "steps": 8, "samples": [{"prompt": "p", "seed": 0}]},
            "speed_model": {"tokens": 128, "steps": 8, "transformer": {"num_layers": 2}}}
    md = write_markdown({"meta": meta, "rows": ROWS, "skipped": [{"method": "mixcache:x", "reason": "ValueError: not built"}]},
                        tmp_path / "bench.md").read_text()
    assert "`mixcache bench --quick`" in md and "mixcache:x" in md and table in md


def test_pareto_plot_writes_a_png(tmp_path):
    path = plot_pareto(ROWS, tmp_path / "p" / "pareto.png", title="synthetic")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_pareto_plot_with_only_failures_or_only_identical_rows(tmp_path):
    plot_pareto([ROWS[-1]], tmp_path / "a.png")
    plot_pareto(ROWS[:2], tmp_path / "b.png")
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_handle_check_calls_flags_a_bypassed_session():
    import pytest

    from mixcache_compile.eval.bench import Handle

    seen = {"n": 0}
    handle = Handle(calls=lambda: seen["n"])
    seen["n"] = 40
    handle.check_calls(0, 40)  # every call went through the session
    with pytest.raises(RuntimeError, match="saw 0 of the generation's 40"):
        handle.check_calls(40, 40)
    Handle().check_calls(None, 40)  # methods without a call counter are not checked
