"""The frontier's results: fraction at quality levels, the Markdown table, the plot, merging runs.

A method's fraction at quality P is the lowest computed fraction among its sweep points with
mean PSNR >= P. The row ``none`` (the uncached model timed against itself: the timing noise)
never counts as a method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LEVELS = (28.0, 32.0, 36.0)
NOT_A_METHOD = {"none"}


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok" and row["method"] not in NOT_A_METHOD


def fraction_at(rows: Sequence[dict[str, Any]], method: str, level: float) -> float | None:
    """The lowest computed fraction among ``method``'s points with mean PSNR >= ``level``."""
    ok = [r["computed_fraction"] for r in rows if r["method"] == method and _ok(r) and r["psnr"] >= level]
    return min(ok) if ok else None


def fraction_at_levels(rows: Sequence[dict[str, Any]], ours: str = "mixcache") -> list[dict[str, Any]]:
    """Per quality level: mixcache's fraction, the best other method's, and their ratio (target <= 0.87)."""
    methods = sorted({r["method"] for r in rows if _ok(r)})
    out = []
    for level in LEVELS:
        mine = fraction_at(rows, ours, level)
        others = [(f, m) for m in methods if m != ours and (f := fraction_at(rows, m, level)) is not None]
        best = min(others) if others else (None, None)
        ratio = mine / best[0] if mine is not None and best[0] else None
        out.append({"psnr": level, ours: mine, "best_other": best[1], "best_other_fraction": best[0], "ratio": ratio})
    return out


def pareto_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both axes (lower or equal fraction and higher or equal mean
    PSNR, one strictly), over all methods; sorted by fraction."""
    pts = [r for r in rows if _ok(r) and math.isfinite(r["psnr"])]
    front = [r for r in pts if not any(
        o["computed_fraction"] <= r["computed_fraction"] and o["psnr"] >= r["psnr"]
        and (o["computed_fraction"] < r["computed_fraction"] or o["psnr"] > r["psnr"]) for o in pts)]
    return sorted(front, key=lambda r: r["computed_fraction"])


def _time(cell: dict[str, Any] | None) -> str:
    if not cell:
        return ""
    if cell.get("status") == "failed":
        return "failed"
    return f"{cell['speedup']:.2f}x"


def method_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per method, cheapest at 32 dB first (methods never reaching it last): its
    fraction at each level and its timed point (``frontier_timing.representative``: the point
    the eager-once and compiled timings use), the side-by-side a user picks a method from."""
    from .frontier_timing import representative

    methods = list(dict.fromkeys(r["method"] for r in rows if _ok(r)))
    out = [{"method": m, "levels": {lv: fraction_at(rows, m, lv) for lv in LEVELS}, "timed": representative(rows, m)}
           for m in methods]
    return sorted(out, key=lambda e: (e["levels"][32.0] is None, e["levels"][32.0] or 0.0, methods.index(e["method"])))


def summary_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """``method_summary`` as a Markdown table (fractions at 28 / 32 / 36 dB, then the timed point)."""
    head = " | ".join(f"fraction at {lv:.0f} dB" for lv in LEVELS)
    lines = [f"| method | {head} | timed point | its mean PSNR dB | its fraction | speedup eager | speedup compiled |",
             "|---" * (6 + len(LEVELS)) + "|"]
    for e in method_summary(rows):
        cells = " | ".join("-" if f is None else f"{f:.3f}" for f in e["levels"].values())
        t = e["timed"]  # never None: every listed method has an ok row
        lines.append(f"| {e['method']} | {cells} | {t.get('knob', '-')} | {t['psnr']:.2f} | {t['computed_fraction']:.3f} | "
                     f"{_time(t.get('wall_eager'))} | {_time(t.get('wall_compiled'))} |")
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any]) -> str:
    front = {(r["method"], r["knob"]) for r in pareto_rows(results["rows"])}
    lines = ["| method | knob | mean PSNR dB | min PSNR dB | SSIM | computed fraction | speedup eager | speedup compiled | Pareto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {r['knob']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        mark = "*" if (r["method"], r["knob"]) in front else ""
        lines.append(f"| {r['method']} | {r['knob']} | {r['psnr']:.2f} | {r['psnr_min']:.2f} | {r['ssim']:.4f} | "
                     f"{r['computed_fraction']:.3f} | {_time(r.get('wall_eager'))} | {_time(r.get('wall_compiled'))} | {mark} |")
    lines += ["", "Per method (timed point: the cheapest reaching 32 dB, else the closest):", "",
              *summary_markdown(results["rows"]).splitlines()]
    lines += ["", "| mean PSNR >= | mixcache fraction | best other (fraction) | ratio (target <= 0.87) |", "|---|---|---|---|"]
    for lv in results["levels"]:
        mine = "-" if lv["mixcache"] is None else f"{lv['mixcache']:.3f}"
        other = "-" if lv["best_other"] is None else f"{lv['best_other']} ({lv['best_other_fraction']:.3f})"
        ratio = "-" if lv["ratio"] is None else f"{lv['ratio']:.2f}"
        lines.append(f"| {lv['psnr']:.0f} dB | {mine} | {other} | {ratio} |")
    return "\n".join(lines) + "\n"


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the rows of ``old`` whose method ``new`` did not run (a partial re-run, e.g.
    ``--methods mixcache``, updating a full run). Both must be on the same workload."""
    for key in ("samples", "steps", "guidance", "weights"):
        if old.get(key) != new.get(key):
            raise ValueError(f"cannot merge frontier runs with different {key}: {old.get(key)!r} vs {new.get(key)!r}")
    rerun = {r["method"] for r in new["rows"]}
    kept = [r for r in old["rows"] if r["method"] not in rerun]
    merged = dict(new)
    rows = kept + list(new["rows"])
    merged["rows"] = [r for r in rows if r["method"] in NOT_A_METHOD] + [r for r in rows if r["method"] not in NOT_A_METHOD]
    merged["levels"] = fraction_at_levels(merged["rows"])
    merged["runs"] = _runs(old) + _runs(new)  # each run's command, end time, load and completeness
    merged["commands"] = [r["command"] for r in merged["runs"] if r.get("command")]
    merged["complete"] = all(r.get("complete", True) for r in merged["runs"])
    return merged


def _runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    if "runs" in results:
        return list(results["runs"])
    return [{k: results.get(k) for k in ("command", "finished", "load_average", "complete")}]


def plot(results: dict[str, Any], path: Path) -> Path:
    """Computed fraction (x) vs mean PSNR (y), one line per method, the Pareto front over all
    methods as a grey step line with its points ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in results["rows"]:
        if _ok(r) and math.isfinite(r["psnr"]):
            by_method.setdefault(r["method"], []).append((r["computed_fraction"], r["psnr"]))
    colours = iter(plt.get_cmap("tab20").colors[2:])  # tab20's first pair (blue) left out; mixcache is red below
    for method, pts in sorted(by_method.items()):
        pts.sort()
        # marker by family (ours o, diffusers s, cache-dit ^): identical rows of two libraries stay visible
        marker = {"diffusers": "s", "cache-dit": "^"}.get(method.split(":")[0], "o") if ":" in method else "o"
        style = dict(lw=2.5, color="tab:red", zorder=5) if method == "mixcache" else dict(lw=1, alpha=0.85, color=next(colours))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, mfc="none" if marker != "o" else None, ms=8 if marker != "o" else 6,
                label=method, **style)
    front = pareto_rows(results["rows"])
    if front:
        xs, ys = [r["computed_fraction"] for r in front], [r["psnr"] for r in front]
        ax.step(xs, ys, where="post", color="black", lw=1, ls="--", alpha=0.6, zorder=4, label="Pareto front (all methods)")
        ax.scatter(xs, ys, s=140, facecolors="none", edgecolors="black", linewidths=1.2, zorder=6)
    for level in LEVELS:
        ax.axhline(level, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("computed fraction (transformer FLOPs run / uncached)")
    ax.set_ylabel("mean PSNR vs uncached (dB)")
    ax.set_title(f"quality / compute frontier, {results['weights']} model, {results['steps']} steps")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
