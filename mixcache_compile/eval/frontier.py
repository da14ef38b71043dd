"""``mixcache frontier``: every method swept over its main knob on a shipped model, one process.

For each method point: mean and min PSNR and SSIM against the uncached output of the same
prompt and seed, and the computed fraction: FLOPs run by the transformer over FLOPs of the
uncached generations, both counted by ``torch.utils.flop_counter.FlopCounterMode`` (around
each transformer call for the peers and the uncached run; on each stage graph run for ours,
whose compiled model Dynamo will not trace under a dispatch mode; the two counts agree where
decisions agree, e.g. our fbcache and diffusers' FBCache). Writes
``DIR/frontier.json``, ``DIR/frontier.md`` (table + the fraction each method needs at 28 / 32
/ 36 dB) and ``DIR/frontier.png`` (computed fraction vs mean PSNR).

Evaluation prompts and seeds are held out from ``mixcache calibrate``'s (``CALIBRATION_*`` in
``eval/budget_fit.py``). A method's fraction at quality P is the lowest fraction among its
sweep points with mean PSNR >= P.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EVAL_PROMPTS = ("blue square moving down", "green circle moving up", "yellow square moving right", "red square moving up",
                "blue circle moving left", "green square moving right")
EVAL_SEEDS = (1000, 1001)
LEVELS = (28.0, 32.0, 36.0)


@dataclass
class Point:
    method: str  # "mixcache", "teacache", "diffusers:magcache", ...
    knob: str
    enable: Callable[[Any, Any], tuple[Callable[[], None], Callable[[], int] | None]]
    # (pipe, peer context) -> (reset before a generation, FLOPs run so far or None to count them)


def _ours(policy: str, knob: str, **options: Any) -> Point:
    def enable(pipe: Any, ctx: Any) -> tuple[Callable[[], None], Callable[[], int] | None]:
        import mixcache_compile

        session = mixcache_compile.enable(pipe, policy=policy, engine="eager", **options)
        # Dynamo does not trace under a dispatch mode, so the session's own count (the same
        # FlopCounterMode, on each stage graph it ran) stands in for the counter around the model.
        return session.reset, lambda: session.stats()["flops_run"]

    return Point(policy, knob, enable)


def _peer(peer: Any) -> Point:
    def enable(pipe: Any, ctx: Any) -> tuple[Callable[[], None], Callable[[], int] | None]:
        why = peer.available()
        if why:
            raise RuntimeError(why)
        peer.enable(pipe, ctx)
        return (lambda: peer.reset(pipe)), None

    return Point(f"{peer.library}:{peer.key}", peer.knob_text, enable)


class TransformerFlops:
    """FLOPs of every call of ``pipe.transformer`` (``FlopCounterMode`` entered around each call)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self.total = 0
        self._mode = FlopCounterMode(display=False)
        self._handles = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._exit)]

    def _enter(self, module: Any, args: Any) -> None:
        self._mode.__enter__()

    def _exit(self, module: Any, args: Any, out: Any) -> None:
        self._mode.__exit__(None, None, None)
        self.total += self._mode.get_total_flops()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def sweep(quick: bool = False, full: bool = False) -> list[Point]:
    """The swept points: each method over its main knob (``full``: a denser sweep)."""
    from .peers import CacheDitDBCachePeer, FirstBlockCachePeer, MagCachePeer, PyramidAttentionBroadcastPeer, TaylorSeerPeer

    def pick(values: tuple, dense: tuple) -> tuple:
        return dense if full else values

    points = [_ours("mixcache", f"threshold={t}", threshold=t) for t in pick((0.08, 0.16, 0.12, 0.24, 0.04), (0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24))]
    if quick:
        return points[:2] + [_ours("teacache", "threshold=0.1", threshold=0.1)]
    points += [_ours("teacache", f"threshold={t}", threshold=t) for t in pick((0.03, 0.05, 0.07, 0.1), (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2))]
    points += [_ours("fbcache", f"threshold={t}", threshold=t) for t in pick((0.05, 0.1), (0.05, 0.1, 0.2))]
    points += [_ours("static", f"every={k}", every=k) for k in pick((2, 3), (2, 3, 4))]
    points += [_ours("fastercache", "defaults"), _ours("fastercache", "alpha=0", alpha_low=0.0, alpha_high=0.0)]
    points += [_ours("pab", "defaults")] if full else []
    points += [_peer(FirstBlockCachePeer(t)) for t in pick((0.05, 0.1), (0.05, 0.1, 0.2))]
    points += [_peer(MagCachePeer(threshold=t)) for t in pick((0.06, 0.24), (0.06, 0.12, 0.24))]
    points += [_peer(TaylorSeerPeer(cache_interval=k)) for k in pick((2, 3), (2, 3, 5))]
    points += [_peer(PyramidAttentionBroadcastPeer(k)) for k in pick((2,), (2, 3))]
    points += [_peer(CacheDitDBCachePeer(t)) for t in pick((0.04, 0.16), (0.04, 0.08, 0.16))]
    return points


def _generate(pipe: Any, prompt: str, seed: int, steps: int, guidance: float) -> torch.Tensor:
    from ..zoo import default_call_kwargs

    with torch.no_grad():
        return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed),
                    **default_call_kwargs(num_inference_steps=steps, guidance_scale=guidance)).frames


def run(points: Sequence[Point], samples: Sequence[tuple[str, int]], steps: int, guidance: float, weights_dir: Path | None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    from ..zoo import load_pipeline
    from .metrics import psnr, ssim
    from .peers import PeerContext, _uncompiled

    base = load_pipeline() if weights_dir is None else load_pipeline(weights_dir=weights_dir)
    base.set_progress_bar_config(disable=True)
    counter = TransformerFlops(base.transformer)
    refs = [_generate(base, p, s, steps, guidance) for p, s in samples]
    counter.remove()
    full_flops = counter.total
    memo: dict[Any, Any] = {}
    rows = []
    for point in points:
        row: dict[str, Any] = {"method": point.method, "knob": point.knob}
        try:
            pipe = copy.deepcopy(base)
            ctx = PeerContext(steps, run_once=lambda p: _generate(p, *samples[0], steps, guidance), memo=memo)
            reset, flops_run = point.enable(pipe, ctx)
            counter = None if flops_run is not None else TransformerFlops(_uncompiled(pipe))
            outs = []
            for p, s in samples:
                reset()
                outs.append(_generate(pipe, p, s, steps, guidance))
            flops = flops_run() if flops_run is not None else counter.total  # type: ignore[union-attr]
        except Exception as err:  # a peer that does not run on this model: say so, keep going
            row.update(status="failed", error=f"{type(err).__name__}: {err}"[:300])
            rows.append(row)
            log(f"{point.method} {point.knob}: FAILED {row['error']}")
            continue
        per = [psnr(o, r) for o, r in zip(outs, refs)]
        row.update(status="ok", psnr=sum(per) / len(per), psnr_min=min(per), psnr_per_sample=per,
                   ssim=sum(ssim(o, r) for o, r in zip(outs, refs)) / len(outs), computed_fraction=flops / full_flops)
        rows.append(row)
        log(f"{point.method:22s} {point.knob:24s} psnr {row['psnr']:6.2f} (min {row['psnr_min']:6.2f}) "
            f"ssim {row['ssim']:.4f} fraction {row['computed_fraction']:.3f}")
    return {"rows": rows, "samples": [list(s) for s in samples], "steps": steps, "guidance": guidance,
            "weights": str(weights_dir) if weights_dir else "shipped", "levels": fraction_at_levels(rows)}


def fraction_at(rows: Sequence[dict[str, Any]], method: str, level: float) -> float | None:
    """The lowest computed fraction among ``method``'s points with mean PSNR >= ``level``."""
    ok = [r["computed_fraction"] for r in rows if r["method"] == method and r.get("status") == "ok" and r["psnr"] >= level]
    return min(ok) if ok else None


def fraction_at_levels(rows: Sequence[dict[str, Any]], ours: str = "mixcache") -> list[dict[str, Any]]:
    """Per quality level: mixcache's fraction, the best other method's, and their ratio (target <= 0.87)."""
    methods = sorted({r["method"] for r in rows if r.get("status") == "ok"})
    out = []
    for level in LEVELS:
        mine = fraction_at(rows, ours, level)
        others = [(f, m) for m in methods if m != ours and (f := fraction_at(rows, m, level)) is not None]
        best = min(others) if others else (None, None)
        ratio = mine / best[0] if mine is not None and best[0] else None
        out.append({"psnr": level, ours: mine, "best_other": best[1], "best_other_fraction": best[0], "ratio": ratio})
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = ["| method | knob | mean PSNR dB | min PSNR dB | SSIM | computed fraction |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['knob']} | failed: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['knob']} | {r['psnr']:.2f} | {r['psnr_min']:.2f} | {r['ssim']:.4f} | "
                     f"{r['computed_fraction']:.3f} |")
    lines += ["", "| mean PSNR >= | mixcache fraction | best other (fraction) | ratio (target <= 0.87) |", "|---|---|---|---|"]
    for lv in results["levels"]:
        mine = "-" if lv["mixcache"] is None else f"{lv['mixcache']:.3f}"
        other = "-" if lv["best_other"] is None else f"{lv['best_other']} ({lv['best_other_fraction']:.3f})"
        ratio = "-" if lv["ratio"] is None else f"{lv['ratio']:.2f}"
        lines.append(f"| {lv['psnr']:.0f} dB | {mine} | {other} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in results["rows"]:
        if r.get("status") == "ok" and math.isfinite(r["psnr"]):
            by_method.setdefault(r["method"], []).append((r["computed_fraction"], r["psnr"]))
    for method, pts in sorted(by_method.items()):
        pts.sort()
        style = dict(lw=2.5, color="tab:red", zorder=5) if method == "mixcache" else dict(lw=1, alpha=0.8)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, **style)
    for level in LEVELS:
        ax.axhline(level, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("computed fraction (FLOPs run / uncached, FlopCounterMode)")
    ax.set_ylabel("mean PSNR vs uncached (dB)")
    ax.set_title(f"quality / compute frontier, {results['weights']} model, {results['steps']} steps")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mixcache frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/frontier"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--prompts", type=int, default=2, help=f"held-out evaluation prompts (at most {len(EVAL_PROMPTS)})")
    p.add_argument("--seeds", type=int, default=1, help=f"held-out seeds per prompt (at most {len(EVAL_SEEDS)})")
    p.add_argument("--weights", type=Path, default=None, help="a weights directory (default: the shipped model)")
    p.add_argument("--methods", default=None, help="comma-separated substrings of method names to keep; '-name' drops that method (default: all)")
    p.add_argument("--quick", action="store_true", help="three points, one sample, 8 steps (a smoke run)")
    p.add_argument("--full", action="store_true", help="a denser sweep of every method's knob")
    p.add_argument("--mixcache-thresholds", default=None, help="comma-separated thresholds replacing mixcache's sweep")
    a = p.parse_args(argv)
    if not 1 <= a.prompts <= len(EVAL_PROMPTS) or not 1 <= a.seeds <= len(EVAL_SEEDS):
        p.error(f"--prompts must be 1..{len(EVAL_PROMPTS)} and --seeds 1..{len(EVAL_SEEDS)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    points = sweep(a.quick, a.full)
    if a.mixcache_thresholds:
        values = [float(v) for v in a.mixcache_thresholds.split(",") if v.strip()]
        points = [pt for pt in points if pt.method != "mixcache"] + [_ours("mixcache", f"threshold={t}", threshold=t) for t in values]
    if a.methods:
        keep = [m.strip() for m in a.methods.split(",") if m.strip()]
        drop = [k[1:] for k in keep if k.startswith("-")]
        keep = [k for k in keep if not k.startswith("-")]
        points = [pt for pt in points if (not keep or any(k in pt.method for k in keep)) and not any(d == pt.method for d in drop)]
    steps = 8 if a.quick else a.steps
    samples = [(EVAL_PROMPTS[i], s) for i in range(1 if a.quick else a.prompts) for s in EVAL_SEEDS[:a.seeds]]
    results = run(points, samples, steps, a.guidance, a.weights, log=lambda s: print(s, file=sys.stderr, flush=True))
    results["command"] = "mixcache frontier " + " ".join(argv if argv is not None else sys.argv[1:])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "frontier.json").write_text(json.dumps(results, indent=2) + "\n")
    (a.out / "frontier.md").write_text(markdown(results))
    plot(results, a.out / "frontier.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
