"""``mixcache frontier``: every method swept over its main knob on a shipped model, one process.

For each method point: mean and min PSNR and SSIM against the uncached output of the same
prompt and seed, and the computed fraction: FLOPs run by the transformer over FLOPs of the
uncached generations, both counted with ``torch.utils.flop_counter``'s formulas (around each
transformer call for the peers and the uncached run, ``flops.TransformerFlops``; on each stage
graph run for ours, whose compiled model Dynamo will not trace under a dispatch mode; the two
counts agree where decisions agree, e.g. our fbcache and diffusers' FBCache). Each point runs
on its own deep copy of the pipeline, switched off again after.

Wall time (``frontier_timing``): every point eager, interleaved with the uncached model, ratio
of medians; with ``--compiled`` also one point per method compiled (ours: ``engine="inductor"``,
peers: plain ``torch.compile`` after their hooks) against the uncached model under plain
``torch.compile``. The row ``none`` is the uncached model timed against itself.

Writes ``DIR/frontier.json``, ``DIR/frontier.md`` (table + the fraction each method needs at
28 / 32 / 36 dB) and ``DIR/frontier.png`` (computed fraction vs mean PSNR, Pareto front
marked); ``--update`` merges the methods run now into an existing ``DIR/frontier.json``.

Evaluation prompts and seeds are held out from ``mixcache calibrate``'s (``CALIBRATION_*`` in
``eval/budget_fit.py``). A method's fraction at quality P is the lowest fraction among its
sweep points with mean PSNR >= P."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .flops import TransformerFlops
from .frontier_report import LEVELS, fraction_at, fraction_at_levels, markdown, merge, plot  # noqa: F401 (re-exported)

EVAL_PROMPTS = ("blue square moving down", "green circle moving up", "yellow square moving right", "red square moving up",
                "blue circle moving left", "green square moving right")
EVAL_SEEDS = (1000, 1001)
# A second held-out set, for checking a result found on the first one: six other prompts of
# the shipped models' vocabulary (none of EVAL_PROMPTS or the calibration prompts) and other
# seeds (``--prompt-set fresh``).
FRESH_PROMPTS = ("red circle moving right", "green square moving up", "blue circle moving down",
                 "yellow square moving left", "green circle moving left", "red square moving down")
FRESH_SEEDS = (2000, 2001)
PROMPT_SETS = {"eval": (EVAL_PROMPTS, EVAL_SEEDS), "fresh": (FRESH_PROMPTS, FRESH_SEEDS)}
MIXCACHE_THRESHOLDS = (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.18)
TEACACHE_THRESHOLDS = (0.03, 0.05, 0.07, 0.08, 0.09, 0.1, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.18)


Enabled = tuple[Callable[[], None], Callable[[], int] | None, Callable[[], None]]
# (reset before a generation, FLOPs run so far or None to count them around the model, switch off)


@dataclass
class Point:
    method: str  # "mixcache", "teacache", "diffusers:magcache", ...
    knob: str
    enable: Callable[[Any, Any, bool], Enabled]  # (pipe, peer context, compiled) -> Enabled


def _ours(policy: str, knob: str, **options: Any) -> Point:
    def enable(pipe: Any, ctx: Any, compiled: bool = False) -> Enabled:
        import mixcache_compile

        session = mixcache_compile.enable(pipe, policy=policy, engine="inductor" if compiled else "eager", **options)
        # Dynamo does not trace under a dispatch mode, so the session's own count (the same
        # FlopCounterMode, on each stage graph it ran) stands in for the counter around the model.
        return session.reset, lambda: session.stats()["flops_run"], lambda: None

    return Point(policy, knob, enable)


def _peer(peer: Any) -> Point:
    def enable(pipe: Any, ctx: Any, compiled: bool = False) -> Enabled:
        why = peer.available()
        if why:
            raise RuntimeError(why)
        peer.enable(pipe, ctx, compiled=compiled)
        return (lambda: peer.reset(pipe)), None, (lambda: peer.disable(pipe))

    return Point(f"{peer.library}:{peer.key}", peer.knob_text, enable)


def sweep(quick: bool = False, full: bool = False) -> list[Point]:
    """The swept points: each method over its main knob (``full``: a denser sweep)."""
    from .peers import CacheDitDBCachePeer, FirstBlockCachePeer, MagCachePeer, PyramidAttentionBroadcastPeer, TaylorSeerPeer

    def pick(values: tuple, dense: tuple) -> tuple:
        return dense if full else values

    if quick:
        return [_ours("mixcache", f"threshold={t}", threshold=t) for t in (0.08, 0.16)] + [_ours("teacache", "threshold=0.1", threshold=0.1)]
    # mixcache and TeaCache (the best other method from 20 % of the compute down) get the same
    # 0.01 spacing where their points are 1-2 computed steps apart, so neither wins the target
    # check (``fraction_at``) by having a point the other lacks.
    points = [_ours("mixcache", f"threshold={t}", threshold=t) for t in pick(MIXCACHE_THRESHOLDS, (0.01, 0.02, *MIXCACHE_THRESHOLDS, 0.24))]
    points += [_ours("teacache", f"threshold={t}", threshold=t) for t in pick(TEACACHE_THRESHOLDS, (0.02, *TEACACHE_THRESHOLDS, 0.2))]
    points += [_ours("fbcache", f"threshold={t}", threshold=t) for t in pick((0.05, 0.1), (0.05, 0.1, 0.2))]
    points += [_ours("static", f"every={k}", every=k) for k in pick((2, 3), (2, 3, 4))]
    points += [_ours("fastercache", "defaults"), _ours("fastercache", "alpha=0", alpha_low=0.0, alpha_high=0.0),
               _ours("fastercache", "cfg_interval=4, alpha=0", cfg_interval=4, alpha_low=0.0, alpha_high=0.0),
               # tuned on the calibration prompts x seeds 7-9 of both shipped models (README, FasterCache)
               _ours("fastercache", "cfg_interval=3, cfg_window=(0.2, 1), alpha=0", cfg_interval=3, cfg_window=(0.2, 1.0),
                     alpha_low=0.0, alpha_high=0.0)]
    points += [_ours("pab", f"interval={k}", interval=k) for k in pick((2, 3), (2, 3, 4))]
    points += [_peer(FirstBlockCachePeer(t)) for t in pick((0.05, 0.1), (0.05, 0.1, 0.2))]
    points += [_peer(MagCachePeer(threshold=t)) for t in pick((0.06, 0.24), (0.06, 0.12, 0.24))]
    points += [_peer(TaylorSeerPeer(cache_interval=k)) for k in pick((2, 3), (2, 3, 5))]
    points += [_peer(PyramidAttentionBroadcastPeer(k)) for k in pick((2, 3), (2, 3, 4))]
    points += [_peer(CacheDitDBCachePeer(t)) for t in pick((0.04, 0.16), (0.04, 0.08, 0.16))]
    return points


def _generate(pipe: Any, prompt: str, seed: int, steps: int, guidance: float) -> torch.Tensor:
    from ..zoo import default_call_kwargs

    with torch.no_grad():
        return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed),
                    **default_call_kwargs(num_inference_steps=steps, guidance_scale=guidance)).frames


def run(points: Sequence[Point], samples: Sequence[tuple[str, int]], steps: int, guidance: float, weights_dir: Path | None,
        log: Callable[[str], None] = print, time_repeats: int = 3, compiled_repeats: int = 0,
        eager_every_point: bool = True, load: Callable[[], Any] | None = None,
        checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Quality and computed fraction of every point; eager wall time (``time_repeats`` > 0) of
    every point (or, not ``eager_every_point``, of one per method after the sweep) and compiled
    wall time (``compiled_repeats`` > 0) of one point per method
    (``frontier_timing.representative``), each against the uncached model on the same engine.
    ``checkpoint`` gets the results so far after every point (a long run keeps what it measured)."""
    from ..zoo import load_pipeline
    from .frontier_report import fraction_at_levels
    from .frontier_timing import interleaved_ratio
    from .metrics import psnr
    from .peers import PeerContext

    base = load() if load is not None else load_pipeline() if weights_dir is None else load_pipeline(weights_dir=weights_dir)
    base.set_progress_bar_config(disable=True)
    counter = TransformerFlops(base.transformer)
    refs = [_generate(base, p, s, steps, guidance) for p, s in samples]
    counter.remove()
    full_flops = counter.total

    def gen0(pipe: Any) -> torch.Tensor:
        return _generate(pipe, *samples[0], steps, guidance)

    # The uncached model timed against itself: what a ratio of 1 looks like on this machine.
    again = psnr(gen0(base), refs[0])
    none: dict[str, Any] = {"method": "none", "knob": "-", "status": "ok", "psnr": again, "psnr_min": again,
                            "psnr_per_sample": [again], "ssim": 1.0, "computed_fraction": 1.0}
    if time_repeats > 0 and eager_every_point:
        none["wall_eager"] = interleaved_ratio(lambda: gen0(base), lambda: gen0(base), time_repeats)
    rows = [none]

    def results(done: bool) -> dict[str, Any]:
        return {"rows": rows, "samples": [list(s) for s in samples], "steps": steps, "guidance": guidance,
                "weights": str(weights_dir) if weights_dir else "shipped", "full_flops": full_flops,
                "levels": fraction_at_levels(rows), "complete": done}

    save = checkpoint or (lambda _: None)
    ctx = PeerContext(steps, run_once=gen0, memo={})
    for point in points:
        row = _measure(point, base, ctx, samples, refs, steps, guidance, full_flops, time_repeats if eager_every_point else 0)
        rows.append(row)
        save(results(False))
        if row["status"] != "ok":
            log(f"{point.method} {point.knob}: FAILED {row['error']}")
            continue
        speed = f" speedup eager {row['wall_eager']['speedup']:.2f}x" if "wall_eager" in row else ""
        log(f"{point.method:22s} {point.knob:24s} psnr {row['psnr']:6.2f} (min {row['psnr_min']:6.2f}) "
            f"ssim {row['ssim']:.4f} fraction {row['computed_fraction']:.3f}{speed}")
    if time_repeats > 0 and not eager_every_point:
        _time_representatives(points, rows, base, ctx, refs[0], gen0, time_repeats, log, lambda: save(results(False)), False)
    if compiled_repeats > 0:
        _time_representatives(points, rows, base, ctx, refs[0], gen0, compiled_repeats, log, lambda: save(results(False)), True)
    return results(True)


def _measure(point: Point, base: Any, ctx: Any, samples: Sequence[tuple[str, int]], refs: Sequence[torch.Tensor], steps: int,
             guidance: float, full_flops: int, time_repeats: int) -> dict[str, Any]:
    """One sweep point on its own fresh copy of the pipeline (no hook or patch of one method
    can reach another's run), switched off again afterwards."""
    from .frontier_timing import interleaved_ratio
    from .metrics import psnr, ssim
    from .peers import _uncompiled

    row: dict[str, Any] = {"method": point.method, "knob": point.knob}
    pipe, disable = copy.deepcopy(base), None
    try:
        reset, flops_run, disable = point.enable(pipe, ctx, False)
        counter = None if flops_run is not None else TransformerFlops(_uncompiled(pipe))
        outs = []
        for p, s in samples:
            reset()
            outs.append(_generate(pipe, p, s, steps, guidance))
        flops = flops_run() if flops_run is not None else counter.total  # type: ignore[union-attr]
        if counter is not None:
            counter.remove()  # the timing below runs without the counter's hooks
        per = [psnr(o, r) for o, r in zip(outs, refs)]
        row.update(status="ok", psnr=sum(per) / len(per), psnr_min=min(per), psnr_per_sample=per,
                   ssim=sum(ssim(o, r) for o, r in zip(outs, refs)) / len(outs), computed_fraction=flops / full_flops)
        if time_repeats > 0:
            def cached() -> Any:
                reset()
                return _generate(pipe, *samples[0], steps, guidance)

            row["wall_eager"] = interleaved_ratio(cached, lambda: _generate(base, *samples[0], steps, guidance), time_repeats)
    except Exception as err:  # a peer that does not run on this model: say so, keep going
        row.update(status="failed", error=f"{type(err).__name__}: {err}"[:300])
    finally:
        if disable is not None:
            with contextlib.suppress(Exception):
                disable()
    return row


def _time_representatives(points: Sequence[Point], rows: list[dict[str, Any]], base: Any, ctx: Any, ref0: torch.Tensor,
                          gen0: Callable[[Any], torch.Tensor], repeats: int, log: Callable[[str], None],
                          save: Callable[[], None], compiled: bool) -> None:
    """Wall time at one point per method (``frontier_timing.representative``) not timed yet,
    against the uncached model on the same engine. Compiled: the uncached model under plain
    ``torch.compile``; peers ``torch.compile`` after their hooks, as their docs do; ours the
    mixcache backend with ``engine="inductor"``. The first generation of each (the compile)
    is not timed; its output's PSNR is kept (``psnr_sample0``)."""
    from .frontier_timing import interleaved_ratio, raised_compile_limits, representative

    key = "wall_compiled" if compiled else "wall_eager"
    with raised_compile_limits() if compiled else contextlib.nullcontext():
        base_t = base
        if compiled:
            base_t = copy.deepcopy(base)
            base_t.transformer = torch.compile(base_t.transformer)
            start = time.perf_counter()
            gen0(base_t)
            log(f"uncached model compiled in {time.perf_counter() - start:.0f} s")
        if key not in rows[0]:
            rows[0][key] = interleaved_ratio(lambda: gen0(base_t), lambda: gen0(base_t), repeats)
        for method in dict.fromkeys(r["method"] for r in rows[1:]):
            row = representative(rows, method)
            point = next((p for p in points if row is not None and (p.method, p.knob) == (row["method"], row["knob"])), None)
            if row is None or point is None or key in row:
                continue
            row[key] = _time_one(point, base, base_t, ctx, ref0, gen0, repeats, log, compiled)
            save()


def _time_one(point: Point, base: Any, base_t: Any, ctx: Any, ref0: torch.Tensor, gen0: Callable[[Any], torch.Tensor],
              repeats: int, log: Callable[[str], None], compiled: bool) -> dict[str, Any]:
    from .frontier_timing import interleaved_ratio
    from .metrics import psnr

    pipe, disable = copy.deepcopy(base), None
    mode = "compiled" if compiled else "eager"
    try:
        reset, _, disable = point.enable(pipe, ctx, compiled)
        reset()
        start = time.perf_counter()
        first = gen0(pipe)
        first_s = time.perf_counter() - start
        gen0(base_t)  # untimed too: a recompile of the baseline the method's setup triggered lands here, not in a sample

        def cached() -> Any:
            reset()
            return gen0(pipe)

        timing = interleaved_ratio(cached, lambda: gen0(base_t), repeats)
        timing.update(status="ok", first_s=first_s, psnr_sample0=psnr(first, ref0))
        log(f"{point.method:22s} {point.knob:24s} {mode}: speedup {timing['speedup']:.2f}x (first generation {first_s:.0f} s)")
    except Exception as err:  # e.g. a peer whose hooks do not trace: say so, keep going
        timing = {"status": "failed", "error": f"{type(err).__name__}: {err}"[:300]}
        log(f"{point.method} {point.knob}: {mode} FAILED {timing['error']}")
    finally:
        if disable is not None:
            with contextlib.suppress(Exception):
                disable()
    return timing


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mixcache frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/frontier"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    # All 12 samples by default: at 6-8 computed steps of 50 one schedule's PSNR moves by several
    # dB from sample to sample, so 2 samples decide the 28 dB level by one or two of them.
    p.add_argument("--prompts", type=int, default=None, help="use the first N prompts (default: all)")
    p.add_argument("--seeds", type=int, default=None, help="use the first N seeds per prompt (default: all)")
    p.add_argument("--prompt-set", choices=tuple(PROMPT_SETS), default="eval",
                   help="which held-out prompts and seeds: eval (the frontier's) or fresh (a second set, for checking)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt of your own (repeatable; replaces the set's prompts)")
    p.add_argument("--seed", action="append", type=int, default=None, metavar="N",
                   help="a seed of your own (repeatable; replaces the set's seeds)")
    p.add_argument("--weights", type=Path, default=None, help="a weights directory (default: the shipped model)")
    p.add_argument("--methods", default=None, help="comma-separated substrings of method names to keep; '-name' drops that method (default: all)")
    p.add_argument("--quick", action="store_true", help="three points, one sample, 8 steps (a smoke run)")
    p.add_argument("--full", action="store_true", help="a denser sweep of every method's knob")
    p.add_argument("--time-repeats", type=int, default=3,
                   help="eager wall time of every point: interleaved repetitions against the uncached model (0: skip)")
    p.add_argument("--eager-timing", choices=("all", "one"), default="all",
                   help="time every point eager during the sweep (all), or one point per method after it (one: a third of the cost)")
    p.add_argument("--compiled", action="store_true",
                   help="also compiled wall time, at one point per method (the cheapest reaching 32 dB); each compile takes ~1-2 min")
    p.add_argument("--compiled-repeats", type=int, default=3, help="interleaved repetitions of the compiled timing")
    p.add_argument("--update", action="store_true",
                   help="merge into an existing OUT/frontier.json: rows of the methods run now replace theirs, the others are kept")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="run nothing: merge these frontier.json files (a later file's rows replace an earlier's, per method) into OUT")
    p.add_argument("--mixcache-thresholds", default=None, help="comma-separated thresholds replacing mixcache's sweep")
    p.add_argument("--teacache-thresholds", default=None,
                   help="comma-separated thresholds replacing teacache's sweep (give the best other the same density)")
    a = p.parse_args(argv)
    try:
        samples = held_out_samples(a.prompt_set, a.prompt, a.seed, a.prompts, a.seeds)
    except ValueError as err:
        p.error(str(err))
    if a.merge:
        return _merge_files(a.merge, a.out)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    points = sweep(a.quick, a.full)
    for method, given in (("mixcache", a.mixcache_thresholds), ("teacache", a.teacache_thresholds)):
        if given:  # replace that method's threshold sweep
            values = [float(v) for v in given.split(",") if v.strip()]
            points = [pt for pt in points if pt.method != method] + [_ours(method, f"threshold={t}", threshold=t) for t in values]
    if a.methods:
        keep = [m.strip() for m in a.methods.split(",") if m.strip()]
        drop = [k[1:] for k in keep if k.startswith("-")]
        keep = [k for k in keep if not k.startswith("-")]
        points = [pt for pt in points if (not keep or any(k in pt.method for k in keep)) and not any(d == pt.method for d in drop)]
    steps = 8 if a.quick else a.steps
    if a.quick:
        samples = samples[:1]
    command = "mixcache frontier " + " ".join(argv if argv is not None else sys.argv[1:])
    a.out.mkdir(parents=True, exist_ok=True)
    existing = a.out / "frontier.json"
    old = json.loads(existing.read_text()) if a.update and existing.exists() else None

    def write(results: dict[str, Any]) -> dict[str, Any]:
        results = dict(results, command=command, finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       load_average=list(os.getloadavg()))
        if old is not None:
            results = merge(old, results)
        existing.write_text(json.dumps(results, indent=2) + "\n")
        (a.out / "frontier.md").write_text(markdown(results))
        plot(results, a.out / "frontier.png")
        return results

    results = write(run(points, samples, steps, a.guidance, a.weights, log=lambda s: print(s, file=sys.stderr, flush=True),
                        time_repeats=a.time_repeats, eager_every_point=a.eager_timing == "all",
                        compiled_repeats=a.compiled_repeats if a.compiled else 0, checkpoint=write))
    print(markdown(results))
    return 0


def held_out_samples(prompt_set: str, prompts: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                     first_prompts: int | None = None, first_seeds: int | None = None) -> list[tuple[str, int]]:
    """The (prompt, seed) samples a run scores: the set's, or the given prompts / seeds, cut to
    the first N of each. Refuses repeated prompts or seeds, counts out of range and samples
    that calibration or tuning used (not held out); warns on words the shipped models' tokenizer maps to <unk>."""
    from ..zoo.text import WordTokenizer
    from .budget_fit import CALIBRATION_PROMPTS, TUNING_SEEDS

    set_prompts, set_seeds = PROMPT_SETS[prompt_set]
    prompt_list, seed_list = tuple(prompts or set_prompts), tuple(seeds or set_seeds)
    repeated = sorted({v for v in prompt_list if prompt_list.count(v) > 1}) + sorted({v for v in seed_list if seed_list.count(v) > 1})
    if repeated:
        raise ValueError(f"{repeated} given more than once: each sample would count twice in the means")
    n_prompts = len(prompt_list) if first_prompts is None else first_prompts
    n_seeds = len(seed_list) if first_seeds is None else first_seeds
    if not 1 <= n_prompts <= len(prompt_list) or not 1 <= n_seeds <= len(seed_list):
        raise ValueError(f"--prompts must be 1..{len(prompt_list)} and --seeds 1..{len(seed_list)}")
    samples = [(prompt, seed) for prompt in prompt_list[:n_prompts] for seed in seed_list[:n_seeds]]
    tuned = [sample for sample in samples if sample[0] in CALIBRATION_PROMPTS and sample[1] in TUNING_SEEDS]
    if tuned:
        raise ValueError(f"{tuned} were used for calibration or tuning (eval/budget_fit.py), so they are not held out: "
                         "pick other prompts or seeds")
    tokenizer = WordTokenizer()
    unknown = sorted({w for prompt, _ in samples for w in tokenizer.unknown_words(prompt)})
    if unknown:
        warnings.warn(f"the shipped models do not know the words {unknown}: their tokenizer reads them as <unk>", stacklevel=2)
    return samples


def _merge_files(paths: Sequence[Path], out: Path) -> int:
    runs = [json.loads(p.read_text()) for p in paths]
    merged = runs[0]
    for run_ in runs[1:]:
        merged = merge(merged, run_)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(merged, indent=2) + "\n")
    (out / "frontier.md").write_text(markdown(merged))
    plot(merged, out / "frontier.png")
    print(markdown(merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
