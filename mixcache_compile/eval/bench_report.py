"""``mixcache bench`` report: ``bench.json``, ``bench.md`` (the table and the run's facts) and
the title of the Pareto plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def write_json(results: dict[str, Any], path: Path) -> Path:
    """JSON with ``Infinity`` for identical outputs (Python's json reads it back as inf)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


def _f(value: float | None, spec: str, inf: str = "∞") -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return inf
    return format(value, spec)


def _row_order(row: dict[str, Any]) -> tuple:
    fam = {"baseline": 0, "mixcache": 1, "diffusers": 2, "cache-dit": 3}.get(row["family"], 4)
    return (0 if row["mode"] == "eager" else 1, fam, row["id"])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | knob | mode | speedup | vs eager | CPU-time speedup | time (s) | first call (s) | PSNR (dB) | SSIM "
            "| computed | notes |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in sorted(rows, key=_row_order):
        notes = list(r.get("notes") or [])
        if r["status"] != "ok":
            where = f" ({r['error_where']})" if r.get("error_where") else ""
            notes.insert(0, f"**FAILED** in {r.get('error_phase') or 'run'}: `{r['error']}`{where}")
        if r["mode"] == "compiled" and r.get("fidelity_from"):
            notes.append("fidelity: eager run of same config")
        if r.get("timing_group") == "group B":
            notes.append("timed in group B, against that group's baseline runs")
        cf = r.get("computed_fraction")
        cfs = r.get("computed_fraction_speed")
        computed = "—" if cf is None and cfs is None else f"{_f(cf, '.2f')} / {_f(cfs, '.2f')}"
        psnr = _f(r.get("psnr"), ".2f")
        if r.get("psnr_min") is not None and r.get("psnr") is not None and not math.isinf(r["psnr"]):
            psnr += f" (min {_f(r['psnr_min'], '.1f')})"
        lines.append(
            f"| `{r['id']}` | {r['knob'] or '—'} | {r['mode']} | {_f(r.get('speedup'), '.2f')}{'x' if r.get('speedup') else ''} "
            f"| {_f(r.get('speedup_vs_eager'), '.2f')}{'x' if r.get('speedup_vs_eager') else ''} "
            f"| {_f(r.get('speedup_cpu'), '.2f')}{'x' if r.get('speedup_cpu') else ''} | {_f(r.get('time_s'), '.2f')} "
            f"| {_f(r.get('first_call_s'), '.1f')} | {psnr} | {_f(r.get('ssim'), '.4f')} | {computed} | {'; '.join(n.replace('|', '/') for n in notes) or ''} |"
        )
    return "\n".join(lines)


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    meta, rows = results.get("meta", {}), results["rows"]
    fid, spd = meta.get("fidelity_model", {}), meta.get("speed_model", {})
    lines = ["# mixcache bench", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    facts = []
    if meta.get("started_utc"):
        facts.append(f"started {meta['started_utc']} UTC")
    if meta.get("wall_s") is not None:
        facts.append(f"wall time {meta['wall_s'] / 60:.1f} min")
    if meta.get("threads"):
        facts.append(f"{meta['threads']} torch thread(s) on {meta.get('cpu_count')} CPU(s)")
    if meta.get("load_average_start"):
        facts.append(f"load average {meta['load_average_start'][0]} at start, {(meta.get('load_average_end') or ['?'])[0]} at end")
    vers = meta.get("versions") or {}
    if vers:
        facts.append(", ".join(f"{k} {v}" for k, v in vers.items() if v))
    if facts:
        lines += ["; ".join(facts) + ".", ""]
    if fid:
        samples = fid.get("samples", [])
        lines.append(f"- Fidelity: shipped tiny model ({fid.get('tokens')} tokens, {fid.get('transformer', {}).get('num_layers')} blocks), "
                     f"{len(samples)} generation(s) ({len({s['prompt'] for s in samples})} prompt(s) x "
                     f"{len({s['seed'] for s in samples})} seed(s)), {fid.get('steps')} steps, CFG {fid.get('guidance_scale')}; "
                     "PSNR/SSIM against the uncached eager output of the same prompt and seed (PSNR pooled over all samples, "
                     "min = worst sample).")
    if spd:
        t = spd.get("transformer", {})
        lines.append(f"- Speed: random-weight WanTransformer3DModel, {t.get('num_layers')} blocks, dim "
                     f"{t.get('num_attention_heads', 0) * t.get('attention_head_dim', 0)}, {spd.get('tokens')} tokens, "
                     f"{spd.get('steps')} steps x 2 CFG calls, in diffusers.WanPipeline; median of {meta.get('repeats')} interleaved "
                     "round(s) after one compile/first generation per row and one untimed round of all rows.")
    lines.append("- speedup: against the uncached baseline of the row's mode measured in the same rounds (eager rows: "
                 "the eager pipeline; compiled rows: plain `torch.compile` (inductor)); vs eager: against the eager pipeline. "
                 "CPU-time speedup: the same ratio from the process CPU time of the same timed calls (insensitive to other "
                 "processes holding the cores). computed: fraction of transformer FLOPs computed (mixcache session "
                 "statistics, fidelity model / speed model).")
    lines += ["", markdown_table(rows), ""]
    skipped = results.get("skipped") or []
    if skipped:
        lines += ["Not run:", ""] + [f"- `{s['method']}`: {s['reason']}" for s in skipped] + [""]
    if meta.get("warning"):
        lines += [f"**Warning:** {meta['warning']}", ""]
    summaries = [(r["id"], r["mode"], r["session_summary"]) for r in rows if r.get("session_summary")]
    if summaries:
        lines += ["## Session summaries (fidelity runs, all samples)", ""]
        for method, mode, text in summaries:
            lines += [f"`{method}` ({mode}):", "", "```", text, "```", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def plot_title(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    spd = meta.get("speed_model", {})
    return (f"speedup (speed model: {spd.get('transformer', {}).get('num_layers')} blocks, {spd.get('tokens')} tokens) "
            f"vs PSNR (shipped model), {meta.get('steps')} steps")
