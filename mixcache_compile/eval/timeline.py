"""The decision timeline: step x branch, each cell coloured by the action the runtime ran."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ..branches import BRANCHES  # noqa: E402
from ..runtime.session import TraceEntry  # noqa: E402

COLOURS = {"FULL": "#4c72b0", "STEP": "#dd8452", "CFG": "#55a868", "BLOCK": "#c44e52", "ATTN": "#8172b3"}


def plot_timeline(trace: Sequence[TraceEntry], path: Path, title: str = "") -> Path:
    """Draw the last generation of ``trace``; returns ``path``."""
    if not trace:
        raise ValueError("empty trace: nothing ran under this session")
    last = max(e.generation for e in trace)
    entries = [e for e in trace if e.generation == last and e.step is not None]
    rows = [b for b in BRANCHES if any(e.branch == b for e in entries)]
    steps = max(e.step for e in entries) + 1
    fig, ax = plt.subplots(figsize=(max(6.0, steps * 0.28) + 1.2, 1.1 + 0.45 * len(rows)), dpi=110)
    for e in entries:
        kind = e.action.split("(")[0]
        ax.add_patch(plt.Rectangle((e.step, rows.index(e.branch)), 0.95, 0.9, color=COLOURS.get(kind, "#999999")))
    ax.set_xlim(0, steps)
    ax.set_ylim(0, len(rows))
    ax.set_yticks([i + 0.45 for i in range(len(rows))], rows)
    ax.set_xlabel("denoising step")
    ax.invert_yaxis()
    used = sorted({e.action.split("(")[0] for e in entries}, key=list(COLOURS).index)
    ax.legend(handles=[Patch(color=COLOURS[k], label=k) for k in used], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
