"""``mixcache bench`` runs: fidelity on the shipped model, then speed on the speed model in
interleaved timing rounds; one result row per method and mode (eager / compiled)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shlex
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .bench_config import BenchConfig
from .bench_methods import Handle, Method, build_methods, compiled_rows_for
from .bench_workloads import ShippedWorkload, SpeedWorkload, file_sha256
from .peers import PeerContext


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 400 else text[:397] + "..."


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def _new_row(method: Method, mode: str) -> dict[str, Any]:
    return {
        "id": method.id, "family": method.family, "knob": method.knob, "mode": mode,
        "baseline": "eager" if mode == "eager" else "inductor",
        "compile_how": method.compile_how if mode == "compiled" else "",
        "status": "ok", "error": None, "error_where": None, "error_phase": None,
        "time_s": None, "baseline_time_s": None, "speedup": None, "speedup_vs_eager": None, "first_call_s": None,
        "cpu_time_s": None, "speedup_cpu": None,
        "psnr": None, "ssim": None, "psnr_min": None, "psnr_per_sample": [], "fidelity_from": None,
        "computed_fraction": None, "computed_fraction_speed": None, "psnr_speed_model": None,
        "timing_group": None, "notes": [], "session_summary": None,
    }


def _fail(row: dict[str, Any], phase: str, err: BaseException) -> None:
    row["status"] = "failed"
    row["error"] = row["error"] or _error_text(err)
    row["error_where"] = row["error_where"] or _where(err)
    row["error_phase"] = row["error_phase"] or phase


def _progress(iterable: Any, desc: str, total: int | None = None) -> Any:
    from ..progress import progress

    return progress(iterable, desc=desc, total=total, unit="method")


def _fidelity(rows: dict[tuple[str, str], dict[str, Any]], methods: list[Method], work: ShippedWorkload) -> dict[str, Any]:
    """Eager rows: every sample with the method vs the uncached eager output of that sample."""
    from .metrics import psnr, ssim

    reference_pipe = work.fresh_pipe()
    references = [work.generate(reference_pipe, s) for s in work.samples]
    del reference_pipe
    memo: dict[Any, Any] = {}
    bar = _progress(methods, "fidelity (shipped model)")
    for method in bar:
        bar.set_postfix_str(method.id[:40])
        row = rows[(method.id, "eager")]
        ctx = PeerContext(work.steps, run_once=lambda p: work.generate(p, work.samples[0]), memo=memo)
        try:
            pipe = work.fresh_pipe()
            handle = method.setup(pipe, work, False, ctx)
            handle.reset_stats()
            outputs = []
            for sample in work.samples:
                handle.reset()
                before = handle.calls() if handle.calls else None
                outputs.append(work.generate(pipe, sample))
                handle.check_calls(before, 2 * work.steps)
        except Exception as err:
            _fail(row, "fidelity", err)
            continue
        finally:
            row["notes"].extend(n for n in ctx.notes if n not in row["notes"])
        per = [psnr(o, r) for o, r in zip(outputs, references)]
        row["psnr_per_sample"] = per
        row["psnr"] = psnr(torch.cat(outputs), torch.cat(references))  # pooled MSE over all samples
        row["psnr_min"] = min(per)
        row["ssim"] = ssim(torch.cat(outputs), torch.cat(references))
        row["fidelity_from"] = "eager"
        stats = handle.stats()
        if "computed_fraction" in stats:
            row["computed_fraction"] = stats["computed_fraction"]
            row["session_summary"] = stats.get("summary")
            _fallback_notes(row, stats, "fidelity model")
        del pipe, handle
    return {"reference_range": [float(torch.cat(references).min()), float(torch.cat(references).max())]}


def _fallback_notes(row: dict[str, Any], stats: dict[str, Any], model: str) -> None:
    """The runtime's most frequent reasons for computing in full what the policy asked to reuse."""
    for reason, count in sorted(stats.get("fallbacks", {}).items(), key=lambda kv: -kv[1])[:2]:
        row["notes"].append(f"{model}: {count} call(s) fell back to FULL ({reason})")


def _speed(rows: dict[tuple[str, str], dict[str, Any]], plan: list[tuple[Method, str]], work: SpeedWorkload,
           repeats: int, memo: dict[Any, Any], group: str, own_baselines: bool) -> dict[str, Any]:
    """Set every row of ``plan`` up in its own pipeline (first call = warm-up / compile), then
    time them round-robin (the plan includes both baselines), one untimed and ``repeats`` timed
    rounds, medians. ``own_baselines``: write the baselines' timings into their rows (the first
    group); a later group only uses its baseline runs for its own rows' speedups."""
    from torch._dynamo.utils import counters

    from .metrics import psnr
    from .timing import interleaved_medians, timed

    sample = work.samples[0]
    expected_calls = 2 * work.steps
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    first_outputs: dict[tuple[str, str], torch.Tensor] = {}
    errors: dict[tuple[str, str], BaseException] = {}
    keep: list[Any] = []
    bar = _progress(plan, f"speed model, {group}: set up + first call/compile")
    for method, mode in bar:
        key = (method.id, mode)
        bar.set_postfix_str(f"{method.id[:36]} [{mode}]")
        row = rows[key]
        if row["status"] == "failed":
            row["notes"].append("speed not measured: the method failed earlier")
            continue
        compiled = mode == "compiled"
        ctx = PeerContext(work.steps, run_once=lambda p: work.generate(p, sample), memo=memo)
        try:
            pipe = work.fresh_pipe()
            handle = method.setup(pipe, work, compiled, ctx)
            handle.reset_stats()
            handle.reset()
            before = handle.calls() if handle.calls else None
            first_s, out = timed(lambda p=pipe: work.generate(p, sample))
            handle.check_calls(before, expected_calls)
        except Exception as err:
            if method.is_baseline and not own_baselines:
                continue
            _fail(row, "speed setup" + (" (compiled)" if compiled else ""), err)
            continue
        finally:
            row["notes"].extend(n for n in ctx.notes if n not in row["notes"])
        if own_baselines or not method.is_baseline:
            row["first_call_s"] = first_s
            row["timing_group"] = group
        first_outputs[key] = out
        stats = handle.stats()
        if "computed_fraction" in stats:
            row["computed_fraction_speed"] = stats["computed_fraction"]
            _fallback_notes(row, stats, "speed model")
        keep.append((pipe, handle))

        def run(p: Any = pipe, h: Handle = handle, k: tuple[str, str] = key) -> object:
            if k in errors:
                return None
            try:
                h.reset()
                before = h.calls() if h.calls else None
                result = work.generate(p, sample)
                h.check_calls(before, expected_calls)  # a mixcache row must run through its own session
                return result
            except Exception as err:  # a failure in a timed round marks the row; its timing is discarded
                errors[k] = err
                return None

        fns[key] = run
    # One untimed round first: setting up a later row (hooks, another compile) can invalidate
    # Dynamo guards of rows set up before it, and their re-traces must not land in timed rounds.
    total = (1 + repeats) * len(fns)
    tick = _progress(range(total), f"timing {group}: 1 untimed + {repeats} round(s) x {len(fns)} rows", total=total)
    tick_iter = iter(tick)
    graphs = counters["stats"]
    done = {"calls": 0}
    recompiled: dict[tuple[str, str], int] = {}

    # Next to the wall-clock medians, the process CPU time of the same timed calls: with one
    # thread it counts the work done and not the time other processes held the cores.
    cpu: dict[tuple[str, str], list[float]] = {k: [] for k in fns}

    def ticking(key: tuple[str, str], fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            before, cpu0 = graphs["unique_graphs"], time.process_time()
            result = fn()
            done["calls"] += 1
            if done["calls"] > len(fns):  # a timed round
                cpu[key].append(time.process_time() - cpu0)
                if graphs["unique_graphs"] > before:  # a timed call that compiled
                    recompiled[key] = recompiled.get(key, 0) + graphs["unique_graphs"] - before
            next(tick_iter, None)
            return result

        return call

    medians = interleaved_medians({k: ticking(k, f) for k, f in fns.items()}, repeats=repeats, warmup=1) if fns else {}
    tick.close()
    for key, n in recompiled.items():
        rows[key]["notes"].append(f"Dynamo compiled {n} graph(s) during timed rounds (time includes it)")
    base_keys = {"eager": ("baseline:uncached", "eager"), "compiled": ("baseline:uncached", "compiled")}
    for key, err in errors.items():
        if key[0] != "baseline:uncached" or own_baselines:
            _fail(rows[key], "timed rounds", err)
    eager_t = medians.get(base_keys["eager"]) if base_keys["eager"] not in errors else None
    for key, t in medians.items():
        row = rows[key]
        if key in errors or (key in base_keys.values() and not own_baselines):
            continue
        row["time_s"] = t
        base = medians.get(base_keys[row["mode"]]) if base_keys[row["mode"]] not in errors else None
        if base is None and row["mode"] == "compiled":
            row["notes"].append("inductor baseline unavailable: speedup against the eager baseline")
            row["baseline"] = "eager"
            base = eager_t
        row["baseline_time_s"] = base
        row["speedup"] = base / t if base else None
        row["speedup_vs_eager"] = eager_t / t if eager_t else None
        row["cpu_time_s"] = statistics.median(cpu[key]) if cpu[key] else None
        base_key = base_keys["compiled"] if row["baseline"] == "inductor" else base_keys["eager"]
        base_cpu = statistics.median(cpu[base_key]) if cpu.get(base_key) else None
        row["speedup_cpu"] = base_cpu / row["cpu_time_s"] if base_cpu and row["cpu_time_s"] else None
        ref = first_outputs.get(base_keys["compiled"] if row["baseline"] == "inductor" else base_keys["eager"])
        if ref is not None and key in first_outputs:
            try:
                row["psnr_speed_model"] = psnr(first_outputs[key], ref, data_range=float(ref.max() - ref.min()))
            except ValueError:
                pass
    keep.clear()
    return {
        "rows_timed": len(fns), "rows_recompiled_in_timed_rounds": len(recompiled),
        "baseline_s": {mode: medians.get(k) for mode, k in base_keys.items()},
    }


def _skip_compiled_of_failed(rows: dict[tuple[str, str], dict[str, Any]]) -> None:
    """A configuration that failed eagerly is not tried compiled (the row says so)."""
    for (mid, mode), row in rows.items():
        eager = rows.get((mid, "eager"))
        if mode == "compiled" and eager is not None and eager["status"] == "failed":
            row["status"] = "failed"
            row["error"] = f"not attempted: the eager run failed ({eager['error']})"
            row["error_phase"] = "not attempted"
            row["error_where"] = eager["error_where"]


def _inherit_fidelity(rows: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Compiled rows carry the fidelity of the same configuration's eager run (same policy and
    knobs; compilation changes numerics only at float rounding level, see ``psnr_speed_model``)."""
    for (mid, mode), row in rows.items():
        eager = rows.get((mid, "eager"))
        if mode != "compiled" or eager is None or eager["psnr"] is None:
            continue
        for k in ("psnr", "ssim", "psnr_min", "psnr_per_sample", "computed_fraction"):
            row[k] = eager[k]
        row["fidelity_from"] = "eager run of the same configuration"


def run(cfg: BenchConfig) -> dict[str, Any]:
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Dozens of compiled copies of the same forward in one process: lift Dynamo's per-code
    # recompile limit so no compiled row silently falls back to eager.
    torch._dynamo.config.recompile_limit = 512
    torch._dynamo.config.accumulated_recompile_limit = 8192
    methods, skipped = build_methods(cfg)
    compiled = compiled_rows_for(cfg, methods)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for m in methods:
        rows[(m.id, "eager")] = _new_row(m, "eager")
    for m in compiled:
        rows[(m.id, "compiled")] = _new_row(m, "compiled")
    shipped = ShippedWorkload(cfg.steps, cfg.prompts, cfg.seeds, cfg.guidance_scale)
    speed_work = SpeedWorkload(cfg)
    meta: dict[str, Any] = {
        "command": "mixcache bench " + " ".join(shlex.quote(a) for a in cfg.argv),
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "versions": _versions(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": _loadavg(),
        "platform": platform.platform(),
        "steps": cfg.steps, "repeats": cfg.repeats, "quick": cfg.quick,
        "fidelity_model": shipped.describe(),
        "speed_model": speed_work.describe(),
        "timing": "each row: one first generation (includes compilation) when it is set up; then one untimed round and "
                  "`repeats` timed rounds in which every row runs once, round-robin with both uncached baselines; median "
                  "per row (eval/timing.py interleaved_medians)",
        "dynamo": {"recompile_limit": 512, "accumulated_recompile_limit": 8192},
    }
    t0 = time.perf_counter()
    with _quiet():
        meta["fidelity"] = _fidelity(rows, methods, shipped)
    meta["fidelity_s"] = time.perf_counter() - t0
    torch._dynamo.reset()  # the fidelity pipelines are gone; start the speed phase with empty Dynamo caches
    _skip_compiled_of_failed(rows)
    # Two timing groups. A peer's hooks compiled by torch.compile make Dynamo serve the models of
    # mixcache rows set up before it from a compiled entry that is not theirs (their sessions stop
    # seeing calls; every mixcache call is checked). So: first everything except the compiled
    # peers, then the compiled peers with fresh runs of both baselines.
    plan = [(m, "eager") for m in methods] + [(m, "compiled") for m in compiled]
    late = [(m, mode) for m, mode in plan if mode == "compiled" and m.family in ("diffusers", "cache-dit")]
    baselines = [(m, mode) for m, mode in plan if m.is_baseline]
    first = [pm for pm in plan if pm not in late]
    memo: dict[Any, Any] = {}
    t0 = time.perf_counter()
    with _quiet():
        meta["speed"] = {"A": _speed(rows, first, speed_work, cfg.repeats, memo, "group A", own_baselines=True)}
        torch._dynamo.reset()
        if late:
            meta["speed"]["B"] = _speed(rows, baselines + late, speed_work, cfg.repeats, memo, "group B", own_baselines=False)
    meta["speed_s"] = time.perf_counter() - t0
    meta["timing_groups"] = ("A: baselines, eager rows and compiled mixcache rows; B: compiled peers (diffusers, cache-dit) "
                             "with their own runs of both baselines in the same rounds")
    _inherit_fidelity(rows)
    sha_end = file_sha256(__import__("mixcache_compile.zoo.pipeline", fromlist=["WEIGHTS_FILE"]).WEIGHTS_FILE)
    if sha_end != meta["fidelity_model"]["weights_sha256"]:
        meta["warning"] = "the shipped weights file changed during the run"
    meta["load_average_end"] = _loadavg()
    meta["wall_s"] = time.perf_counter() - started
    return {"meta": meta, "rows": list(rows.values()), "skipped": skipped}


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: how busy the machine was (timings are wall-clock)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "cache_dit", "mixcache_compile"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", None)
        except Exception:
            out[mod] = None
    return out


@contextlib.contextmanager
def _quiet() -> Any:
    """Keep the terminal to the progress bars: library warnings and INFO logs are not results."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "CACHE_DIT", "torch._dynamo", "torch._inductor")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlevel = dlog.get_verbosity()
        dlog.set_verbosity_error()
    except Exception:
        dlog = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)
            if dlog is not None:
                dlog.set_verbosity(dlevel)
