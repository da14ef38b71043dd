"""``CacheSession.summary()``: what the cache did, as a short human-readable table.

Built from the session's ``stats()`` (totals, computed fraction, cache memory) and its
``trace`` (one entry per call: the per-branch action counts and the fallbacks with what was
requested). Both are cleared together by ``reset_stats()``, so the two always describe the
same calls.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..policies.protocol import Action

# Column order of the action table; kinds a policy never ran are left out.
_KINDS = ("FULL", "STEP", "CFG", "BLOCK", "ATTN")
_BRANCHES = ("cond", "uncond", "batch")


def format_summary(policy: Any, stats: Mapping[str, Any], trace: Sequence[Any]) -> str:
    """The table (see the module docstring). ``policy``: the session's policy object;
    ``trace``: its ``TraceEntry`` list."""
    lines = [f"mixcache session: policy {describe_policy(policy)}"]
    steps = {(e.generation, e.step) for e in trace if e.step is not None}
    lines.append(
        f"calls {stats.get('calls', len(trace))}, steps {len(steps)}, generations {stats.get('generations', 0)}; "
        f"computed fraction {stats.get('computed_fraction', 1.0):.3f} (FLOPs run / FLOPs of computing every call)"
    )
    lines += _action_table(trace)
    lines += _fallback_lines(trace, stats.get("non_finite", 0))
    lines.append(
        f"cache memory: {human_bytes(stats.get('cache_bytes', 0))} held, {human_bytes(stats.get('cache_peak_bytes', 0))} peak, "
        f"{stats.get('cache_allocations', 0)} allocations"
    )
    return "\n".join(lines)


def describe_policy(policy: Any) -> str:
    """``name`` plus the config fields that differ from their defaults (``fbcache(threshold=0.1)``)."""
    name = getattr(policy, "name", type(policy).__name__)
    config = getattr(policy, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return name
    try:
        defaults = type(config)()  # normalised defaults, so "step" and Action(STEP) compare equal
    except Exception:  # a config without defaults for every field: show every field
        defaults = None
    changed = [
        f"{f.name}={_brief(getattr(config, f.name))}"
        for f in dataclasses.fields(config)
        if defaults is None or getattr(config, f.name) != getattr(defaults, f.name)
    ]
    return f"{name}({', '.join(changed)})" if changed else f"{name} (defaults)"


def _brief(value: Any, limit: int = 60) -> str:
    """A one-line form of an option value: actions as their ``str``, cut at ``limit`` characters."""
    text = _spell(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _spell(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_spell(k)}: {_spell(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (frozenset, set)):
        return "{" + ", ".join(_spell(v) for v in sorted(value)) + "}"
    if isinstance(value, (Action, float)):
        return str(value) if isinstance(value, Action) else f"{value:g}"
    return repr(value)


def _action_table(trace: Sequence[Any]) -> list[str]:
    """Calls per branch and action kind, one row per branch and a total row."""
    counts: dict[str, Counter[str]] = {}
    for e in trace:
        counts.setdefault(e.branch, Counter())[action_kind(e.action)] += 1
    if not counts:
        return ["no calls yet"]
    total: Counter[str] = sum(counts.values(), Counter())
    kinds = [k for k in _KINDS if total[k]] + sorted(k for k in total if k not in _KINDS)
    branches = [b for b in _BRANCHES if b in counts] + sorted(b for b in counts if b not in _BRANCHES)
    header = ["branch", "calls", *kinds, "reused"]
    rows = [[b, *_row(counts[b], kinds)] for b in branches]
    if len(branches) > 1:
        rows.append(["all", *_row(total, kinds)])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *rows]]


def _row(counter: Counter[str], kinds: list[str]) -> list[Any]:
    calls = sum(counter.values())
    reused = calls - counter["FULL"]  # every call that reused something (a whole call, a branch, blocks or attention)
    return [calls, *(counter[k] for k in kinds), f"{reused / calls:.0%}" if calls else "-"]


def _fallback_lines(trace: Sequence[Any], non_finite: int) -> list[str]:
    """Calls whose requested action could not run (they computed in full), by request and reason."""
    fallbacks = Counter((action_kind(e.requested), e.fallback) for e in trace if e.fallback)
    if not fallbacks:
        return ["fallbacks: none"]
    lines = [f"fallbacks: {sum(fallbacks.values())} call(s) computed in full instead of the requested action"]
    for (requested, reason), n in fallbacks.most_common():
        lines.append(f"  {n:>5}  {requested:<5} -> FULL: {reason}")
    if non_finite:
        lines.append(f"  ({non_finite} non-finite value(s) seen in caches or indicators)")
    return lines


def action_kind(action_text: str) -> str:
    """``"BLOCK(1-3)"`` -> ``"BLOCK"`` (the trace keeps actions as their ``str``)."""
    return action_text.split("(", 1)[0]


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
