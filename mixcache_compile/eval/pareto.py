"""Pareto plot of a benchmark: speedup (x) against PSNR (y), one marker per row.

Eager rows are circles, compiled rows triangles; colour is the method family. Rows whose
output equals the reference (PSNR infinite) sit on a dashed line above the finite points,
labelled "identical". The Pareto front of each mode (no other row of that mode is both faster
and more faithful) is drawn as a step line. Failed rows are not plotted (the table lists them).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

FAMILY_COLOURS = {"baseline": "black", "mixcache": "tab:red", "diffusers": "tab:blue", "cache-dit": "tab:green"}
MODE_MARKERS = {"eager": "o", "compiled": "^"}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another (larger or equal x and y, one strictly), sorted by x."""
    front = []
    for x, y in points:
        dominated = any((ox >= x and oy >= y) and (ox > x or oy > y) for ox, oy in points)
        if not dominated:
            front.append((x, y))
    return sorted(set(front))


def _short(row: dict[str, Any]) -> str:
    ident = row["id"].split(":", 1)[-1]
    prefix = {"diffusers": "d:", "cache-dit": "cd:", "mixcache": "", "baseline": ""}.get(row.get("family", ""), "")
    for long, short in (("residual_diff_threshold=", "t="), ("threshold=", "t="), ("cache_interval=", "k="),
                        ("spatial_attention_block_skip_range=", "skip=")):
        ident = ident.replace(long, short)
    return prefix + ident


def plot_pareto(rows: list[dict[str, Any]], path: str | Path, title: str = "speedup vs PSNR", label: bool = True) -> Path:
    """Write the plot (PNG, matplotlib's Agg backend) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("speedup") is not None and r.get("psnr") is not None]
    finite = [r["psnr"] for r in ok if not math.isinf(r["psnr"])]
    top = (max(finite) + 4.0) if finite else 40.0
    bottom = (min(finite) - 2.0) if finite else 0.0

    fig, ax = plt.subplots(figsize=(12, 7), dpi=120)
    for mode, marker in MODE_MARKERS.items():
        pts = []
        for r in (r for r in ok if r["mode"] == mode):
            y = top if math.isinf(r["psnr"]) else r["psnr"]
            pts.append((r["speedup"], y))
            ax.scatter(r["speedup"], y, marker=marker, s=60, color=FAMILY_COLOURS.get(r["family"], "grey"),
                       edgecolors="black", linewidths=0.5, zorder=3)
            if label:
                ax.annotate(_short(r), (r["speedup"], y), textcoords="offset points", xytext=(4, 3), fontsize=6.5, zorder=4)
        front = pareto_front(pts)
        if len(front) > 1:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color="grey", lw=1, ls="-" if mode == "eager" else ":",
                    alpha=0.7, zorder=2, label=f"Pareto front ({mode})")
    if any(math.isinf(r["psnr"]) for r in ok):
        ax.axhline(top, color="grey", lw=0.8, ls="--", zorder=1)
        ax.text(ax.get_xlim()[0] if ok else 0, top, " identical (PSNR ∞)", va="bottom", fontsize=7, color="grey")
    ax.axvline(1.0, color="grey", lw=0.6, zorder=1)
    for fam, colour in FAMILY_COLOURS.items():
        if any(r["family"] == fam for r in ok):
            ax.scatter([], [], color=colour, marker="s", label=fam)
    for mode, marker in MODE_MARKERS.items():
        if any(r["mode"] == mode for r in ok):
            ax.scatter([], [], color="white", edgecolors="black", marker=marker,
                       label=f"{mode} (speedup vs {'eager' if mode == 'eager' else 'inductor'} baseline)")
    ax.set_ylim(bottom, top + 2.0)
    ax.set_xlabel("speedup over the uncached baseline of the same mode (x)")
    ax.set_ylabel("PSNR vs uncached output (dB)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        names = ", ".join(sorted({f"{r['id']} [{r['mode']}]" for r in failed}))
        fig.text(0.01, 0.005, f"failed (not plotted): {names}", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
