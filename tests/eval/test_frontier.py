"""mixcache frontier: the fraction-at-quality rule and its table, on hand-made rows (the
sweep itself runs 50-step generations of every method: minutes, not a unit test)."""

from __future__ import annotations

import pytest

from mixcache_compile.eval.frontier import fraction_at, fraction_at_levels, markdown, sweep


def _row(method: str, psnr: float, fraction: float) -> dict:
    return {"method": method, "knob": f"p{psnr:g}", "status": "ok", "psnr": psnr, "psnr_min": psnr - 1, "ssim": 0.9,
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


@pytest.mark.parametrize("full", [False, True])
def test_mixcache_and_teacache_are_swept_alike_where_the_target_is_decided(full: bool):
    """Between 0.07 and 0.18 (20 % of the compute down to 6 computed steps of 50) both methods
    have a point at every 0.01 step up to 0.16: the target check picks each one's cheapest point
    per level, so a point only one of them has would decide it."""
    knobs = {m: {float(p.knob.split("=")[1]) for p in sweep(full=full) if p.method == m} for m in ("mixcache", "teacache")}
    shared = {round(0.07 + 0.01 * k, 2) for k in range(10)} | {0.18}
    assert shared <= knobs["mixcache"] and shared <= knobs["teacache"]
    assert {t for t in knobs["mixcache"] if 0.07 <= t <= 0.18} == {t for t in knobs["teacache"] if 0.07 <= t <= 0.18}


def test_the_command_scores_all_twelve_held_out_samples_by_default(monkeypatch, tmp_path):
    from mixcache_compile.eval import frontier

    seen = {}
    monkeypatch.setattr(frontier, "run", lambda points, samples, *a, **k: seen.setdefault("samples", samples) and {"rows": []})
    monkeypatch.setattr(frontier, "markdown", lambda results: "")
    monkeypatch.setattr(frontier, "plot", lambda results, path: path)
    monkeypatch.setattr(frontier.torch, "set_num_threads", lambda n: None)  # keep the worker's threads
    assert frontier.main(["--methods", "mixcache", "--out", str(tmp_path)]) == 0
    prompts, seeds = frontier.PROMPT_SETS["eval"]
    assert seen["samples"] == [(p, s) for p in prompts for s in seeds] and len(seen["samples"]) == 12


# ---- wall time --------------------------------------------------------------------------
def test_interleaved_ratio_alternates_and_takes_the_ratio_of_medians():
    from mixcache_compile.eval.frontier_timing import interleaved_ratio

    now = [0.0]
    durations = {"base": iter([1.0, 1.25, 4.0]), "method": iter([0.5, 8.0, 0.25])}  # one outlier each (exact in binary)
    order = []

    def make(name):
        def fn():
            order.append(name)
            now[0] += next(durations[name])
        return fn

    out = interleaved_ratio(make("method"), make("base"), repeats=3, clock=lambda: now[0])
    assert order == ["base", "method", "method", "base", "base", "method"] == out["order"]
    assert out["samples"] == {"method": [0.5, 8.0, 0.25], "base": [1.0, 1.25, 4.0]}
    assert out["method_s"] == 0.5 and out["base_s"] == 1.25  # medians: the outliers do not move them
    assert out["ratio"] == pytest.approx(0.5 / 1.25) and out["speedup"] == pytest.approx(1.25 / 0.5)


def test_representative_point_is_the_cheapest_reaching_32_db_else_the_closest():
    from mixcache_compile.eval.frontier_timing import representative

    assert representative(ROWS, "teacache")["psnr"] == 32.5
    assert representative(ROWS, "mixcache")["computed_fraction"] == 0.18
    assert representative([_row("x", 20.0, 0.1), _row("x", 30.0, 0.3)], "x")["psnr"] == 30.0
    assert representative(ROWS, "diffusers:pab") is None  # failed rows are never timed


# ---- report -----------------------------------------------------------------------------
def test_pareto_rows_over_all_methods_and_marked_in_the_table():
    from mixcache_compile.eval.frontier_report import pareto_rows

    rows = ROWS + [_row("teacache", 20.0, 0.05)]
    front = [(r["method"], r["psnr"]) for r in pareto_rows(rows)]
    # teacache 27 dB at 0.15 loses to mixcache 29 dB at 0.12; teacache 20 dB at 0.05 is the cheapest of all
    assert front == [("teacache", 20.0), ("mixcache", 29.0), ("mixcache", 33.0), ("mixcache", 40.0)]
    table = markdown({"rows": rows, "levels": fraction_at_levels(rows)})
    assert "| teacache | p27 | 27.00 | 26.00 | 0.9000 | 0.150 |  |  |  |" in table
    assert "| teacache | p20 | 20.00 | 19.00 | 0.9000 | 0.050 |  |  | * |" in table


def test_none_row_never_counts_as_the_best_other_method():
    rows = ROWS + [{**_row("none", float("inf"), 1.0)}, _row("mixcache", 45.0, 0.9)]
    level = {lv["psnr"]: lv for lv in fraction_at_levels(rows)}[36.0]
    assert level["best_other"] == "teacache"


def test_merge_replaces_the_rerun_methods_and_keeps_the_others():
    from mixcache_compile.eval.frontier_report import merge

    meta = {"samples": [["p", 1]], "steps": 50, "guidance": 5.0, "weights": "shipped"}
    old = {**meta, "rows": ROWS, "command": "mixcache frontier --all"}
    new = {**meta, "rows": [_row("mixcache", 36.5, 0.10)], "command": "mixcache frontier --methods mixcache"}
    merged = merge(old, new)
    assert [r["psnr"] for r in merged["rows"] if r["method"] == "mixcache"] == [36.5]
    assert sum(r["method"] == "teacache" for r in merged["rows"]) == 3
    assert {lv["psnr"]: lv for lv in merged["levels"]}[36.0]["mixcache"] == 0.10
    assert merged["commands"] == ["mixcache frontier --all", "mixcache frontier --methods mixcache"]
    assert [r["command"] for r in merge(merged, new)["runs"]] == merged["commands"] + ["mixcache frontier --methods mixcache"]
    with pytest.raises(ValueError, match="steps"):
        merge(old, {**new, "steps": 30})


# ---- one process, several methods (shipped tiny model, 4 steps) --------------------------
def test_diffusers_hooks_then_cache_dit_in_one_run_with_interleaved_timing():
    """The run that used to fail: diffusers' FBCache, then cache-dit's DBCache, in one process
    and one ``run``. Both measure; each method is timed once, interleaved with the uncached
    model; the ``none`` row's ratio is the ratio of the medians of its interleaved samples."""
    pytest.importorskip("cache_dit")
    from mixcache_compile.eval.frontier import _peer, run
    from mixcache_compile.eval.peers import CacheDitDBCachePeer, FirstBlockCachePeer

    points = [_peer(FirstBlockCachePeer(0.3)), _peer(CacheDitDBCachePeer(0.5, max_warmup_steps=1))]
    saved = []
    res = run(points, [("blue square moving down", 1000)], steps=4, guidance=5.0, weights_dir=None, log=lambda s: None,
              time_repeats=2, eager_every_point=False, checkpoint=lambda r: saved.append(len(r["rows"])))
    rows = {r["method"]: r for r in res["rows"]}
    assert [r.get("status") for r in res["rows"]] == ["ok", "ok", "ok"], [r.get("error") for r in res["rows"]]
    assert 0 < rows["cache-dit:dbcache"]["computed_fraction"] < 1.0  # it cached, and was counted
    assert rows["none"]["psnr"] == float("inf") and rows["none"]["computed_fraction"] == 1.0
    timing = rows["none"]["wall_eager"]
    assert timing["order"] == ["base", "method", "method", "base"]
    med = {k: sorted(v)[0] / 2 + sorted(v)[1] / 2 for k, v in timing["samples"].items()}
    assert timing["ratio"] == pytest.approx(med["method"] / med["base"])
    for method in ("diffusers:fbcache", "cache-dit:dbcache"):
        assert rows[method]["wall_eager"]["status"] == "ok" and len(rows[method]["wall_eager"]["order"]) == 4
    assert res["complete"] and saved[:2] == [2, 3]  # a checkpoint after every point


def test_held_out_prompt_sets_are_disjoint_from_each_other_and_from_calibration():
    """The fresh set checks a result found on the eval set: no prompt and no seed in common,
    and neither shares a prompt with what ``mixcache calibrate`` tunes on; every prompt is in
    the shipped models' vocabulary (an unknown word would be encoded as UNK)."""
    from mixcache_compile.eval.budget_fit import CALIBRATION_PROMPTS, CALIBRATION_SEEDS
    from mixcache_compile.eval.frontier import PROMPT_SETS
    from mixcache_compile.zoo.spec import VOCAB

    (eval_prompts, eval_seeds), (fresh_prompts, fresh_seeds) = PROMPT_SETS["eval"], PROMPT_SETS["fresh"]
    assert not set(eval_prompts) & set(fresh_prompts) and not set(eval_seeds) & set(fresh_seeds)
    for prompts, seeds in PROMPT_SETS.values():
        assert not set(prompts) & set(CALIBRATION_PROMPTS) and not set(seeds) & set(CALIBRATION_SEEDS)
        assert len(set(prompts)) == len(prompts) == 6
        assert all(word in VOCAB for prompt in prompts for word in prompt.split())


# ---- which samples ----------------------------------------------------------------------
def test_own_prompts_and_seeds_replace_the_sets():
    from mixcache_compile.eval.frontier import PROMPT_SETS, held_out_samples

    assert held_out_samples("eval", ["red square moving left", "blue circle moving up"], [5, 6]) == [
        ("red square moving left", 5), ("red square moving left", 6), ("blue circle moving up", 5), ("blue circle moving up", 6)]
    fresh_prompts = PROMPT_SETS["fresh"][0]
    assert held_out_samples("fresh", seeds=[31], first_prompts=2) == [(fresh_prompts[0], 31), (fresh_prompts[1], 31)]


def test_calibration_samples_and_bad_counts_are_refused_by_name():
    from mixcache_compile.eval.frontier import held_out_samples

    with pytest.raises(ValueError, match=r"\('red circle moving left', 8\).*not held out"):
        held_out_samples("eval", ["red circle moving left"], [8, 1000])
    assert held_out_samples("eval", ["red circle moving left"], [1000]) == [("red circle moving left", 1000)]
    with pytest.raises(ValueError, match="--prompts must be 1..6"):
        held_out_samples("eval", first_prompts=7)
    with pytest.raises(ValueError, match=r"\[5\] given more than once"):
        held_out_samples("eval", seeds=[5, 6, 5])


def test_words_the_tokenizer_does_not_know_are_named():
    from mixcache_compile.eval.frontier import held_out_samples

    with pytest.warns(UserWarning, match=r"\['purple', 'triangle'\]"):
        held_out_samples("eval", ["purple triangle moving up"], [3])


def test_method_summary_lists_each_method_by_its_fraction_at_32_db_with_its_timed_point():
    from mixcache_compile.eval.frontier_report import method_summary, summary_markdown

    timed = {**_row("teacache", 32.5, 0.25), "wall_eager": {"speedup": 3.5}, "wall_compiled": {"status": "failed"}}
    rows = [r if (r["method"], r.get("psnr")) != ("teacache", 32.5) else timed for r in ROWS]
    summary = method_summary(rows)
    assert [e["method"] for e in summary] == ["mixcache", "teacache", "diffusers:magcache"]  # 0.18, 0.25, 0.50 at 32 dB
    assert summary[1]["levels"] == {28.0: 0.25, 32.0: 0.25, 36.0: 0.33}
    assert summary[1]["timed"] is timed and summary[0]["timed"]["computed_fraction"] == 0.18
    table = summary_markdown(rows)
    head, rule = table.splitlines()[:2]
    assert head.count("|") == rule.count("|") == 10  # a delimiter row of another width does not render
    assert "| teacache | 0.250 | 0.250 | 0.330 | p32.5 | 32.50 | 0.250 | 3.50x | failed |" in table
    assert "| diffusers:magcache | 0.500 | 0.500 | - | p33 | 33.00 | 0.500 |  |  |" in table
    assert "diffusers:pab" not in table  # failed everywhere: no fraction, nothing timed
    assert table in markdown({"rows": rows, "levels": fraction_at_levels(rows)})
