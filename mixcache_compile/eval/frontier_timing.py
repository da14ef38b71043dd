"""Wall time of a method as a ratio against the uncached model on the same engine.

Both run in one process, interleaved (A B, then B A, ...) so load changes on a shared machine
hit both alike, and the ratio is of the medians over the repetitions. ``ratio`` is the
method's time over the uncached time (below 1: faster); ``speedup`` its inverse.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

# Compiled timing builds one compiled transformer per timed method in one process, all of the
# same class: Dynamo's default limits (8 recompiles per code object) would silently send the
# later ones back to eager. Raised only while the frontier runs its compiled phase.
COMPILE_LIMITS = {"recompile_limit": 256, "accumulated_recompile_limit": 4096}


def interleaved_ratio(run_method: Callable[[], Any], run_base: Callable[[], Any], repeats: int,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time ``run_method`` and ``run_base`` ``repeats`` times each, alternating which goes first.

    Returns the medians, their ratio, every sample and the order the runs were made in."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    samples: dict[str, list[float]] = {"method": [], "base": []}
    order: list[str] = []
    fns = {"method": run_method, "base": run_base}
    for i in range(repeats):
        for name in (("base", "method") if i % 2 == 0 else ("method", "base")):
            start = clock()
            fns[name]()
            samples[name].append(clock() - start)
            order.append(name)
    method_s, base_s = statistics.median(samples["method"]), statistics.median(samples["base"])
    return {"method_s": method_s, "base_s": base_s, "ratio": method_s / base_s, "speedup": base_s / method_s,
            "repeats": repeats, "samples": samples, "order": order}


def representative(rows: Sequence[dict[str, Any]], method: str, target_psnr: float = 32.0) -> dict[str, Any] | None:
    """The sweep point of ``method`` timed compiled: the cheapest point reaching ``target_psnr``
    (the middle quality level), or, if none does, the point closest to it."""
    ok = [r for r in rows if r["method"] == method and r.get("status") == "ok"]
    if not ok:
        return None
    reaching = [r for r in ok if r["psnr"] >= target_psnr]
    if reaching:
        return min(reaching, key=lambda r: r["computed_fraction"])
    return min(ok, key=lambda r: abs(r["psnr"] - target_psnr))


class raised_compile_limits:  # noqa: N801 (a context manager, used like a function)
    """Raise Dynamo's recompile limits inside the block; restore them after."""

    def __enter__(self) -> None:
        import torch._dynamo.config as config

        self._old = {k: getattr(config, k) for k in COMPILE_LIMITS if hasattr(config, k)}
        for k in self._old:
            setattr(config, k, max(COMPILE_LIMITS[k], self._old[k]))

    def __exit__(self, *args: Any) -> None:
        import torch._dynamo.config as config

        for k, v in self._old.items():
            setattr(config, k, v)
