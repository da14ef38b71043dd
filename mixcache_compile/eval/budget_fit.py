"""``mixcache calibrate --target-psnr X``: fit ``mixcache``'s error-budget coefficients for a
model and find the threshold that reaches a target quality on calibration prompts and seeds.

1. **Rates** (one uncached generation per calibration sample, plain PyTorch hooks): at each
   step ``i`` the indicator ``x_i`` (rel-L1 change of the timestep modulation the blocks
   receive: the runtime's prologue probe) and, per reusable quantity ``q``, the rel-L1 error
   reusing it would make: ``step`` = change of each branch's output; ``step_extrapolated`` =
   error of the first-order extrapolation from the two previous steps; ``cfg`` = change of the
   CFG difference; ``block`` = change of the middle blocks' residual; ``attn`` = change of the
   self-attention outputs. ``r_q = sum_i D_q(i) / sum_i x_i`` (after warm-up).
2. **Coefficients** ``k_q = I_q * r_q / (I_step * r_step)``: ``I_q`` is the final-output
   sensitivity to an error in ``q`` (``SENSITIVITY``: measured on the shipped model with
   ``calibrate(mode="reuse")``; attention taken as the block residual's), so ``k_step = 1`` and
   the threshold is in units of the step indicator (TeaCache's scale).
3. **Savings**: the FLOP share of the middle blocks and of the self-attention modules in one
   call (``FlopCounterMode``, per module).
4. **Threshold**: bisection on a log scale for the largest threshold whose mean PSNR on the
   calibration samples (vs their uncached outputs) is at least the target, step reuse alone.
5. **Price check** (Note [price check] in ``fit``): each partial reuse (cfg, block, attn) is
   added at that threshold; it keeps its coefficient only if its point lies above the
   step-only quality/compute curve, else it is priced out; with any kept, the threshold is
   searched again with them. (The rates and one-step sensitivities alone under-price the
   partial reuses on the shipped model: CFG reuse looked cheap by them and lost end to end.)

The result is a JSON ``MixCacheConfig(calibration=path)`` loads (``calibration.load_budget``),
with the sampler's timesteps of the run (the time of the step extrapolation) and the weights'
fingerprint; shipped models' files live in ``policies/calibrations/NAME.json`` and are picked
by that fingerprint (Note [calibration per model] in ``mixcache.py``).
Calibration prompts/seeds are disjoint from the frontier's evaluation ones (held out).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..model_parts import find_blocks, first_output
from ..policies.budget import COEFFICIENTS, PRICED_OUT

CALIBRATION_PROMPTS = ("red circle moving left", "yellow circle moving down")  # --samples 1: the first only
CALIBRATION_SEEDS = (7,)
# Seeds other tuning used with CALIBRATION_PROMPTS (tools/fastercache_tune.py): not held out either.
TUNING_SEEDS = (7, 8, 9)
# Raw reuse-mode sensitivities measured on the shipped model (final rel-L1 per unit rel-L1 of
# the reused tensor; the former mixcache defaults). Attention is taken as the block residual's.
SENSITIVITY = {"step": 0.0248, "step_extrapolated": 0.0248, "cfg": 0.00288, "block": 0.00991, "attn": 0.00991}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / (b.abs().mean() + 1e-12))


class _Recorder:
    """Per call: the modulation input of block 0, the output, the middle residual, attention."""

    def __init__(self, model: torch.nn.Module, fn: int, bn: int) -> None:

        self.blocks = find_blocks(model)
        self.first, self.last = fn, len(self.blocks) - bn - 1
        self.calls: list[dict[str, torch.Tensor]] = []
        self._cur: dict[str, torch.Tensor] = {}
        self._handles = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._end)]
        self._handles.append(self.blocks[0].register_forward_pre_hook(self._temb, with_kwargs=True))
        self._handles.append(self.blocks[self.first].register_forward_pre_hook(self._range_in, with_kwargs=True))
        self._handles.append(self.blocks[self.last].register_forward_hook(self._range_out))
        for g, block in enumerate(self.blocks):
            attn = getattr(block, "attn1", None)
            if attn is not None:
                self._handles.append(attn.register_forward_hook(lambda m, a, o, _g=g: self._cur.__setitem__(f"attn{_g}", first_output(o).detach().clone())))

    def _start(self, module: Any, args: Any) -> None:
        self._cur = {}

    def _end(self, module: Any, args: Any, out: Any) -> None:
        self._cur["out"] = first_output(out).detach().clone()
        self.calls.append(self._cur)

    def _temb(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._cur["temb"] = (kwargs["temb"] if "temb" in kwargs else args[2]).detach().clone()

    def _range_in(self, module: Any, args: tuple, kwargs: dict) -> None:
        self._cur["h_in"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone()

    def _range_out(self, module: Any, args: Any, out: Any) -> None:
        self._cur["res"] = first_output(out).detach() - self._cur.pop("h_in")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def rates(calls: Sequence[dict[str, torch.Tensor]], warm: int = 2) -> dict[str, float]:
    """``r_q`` from the recorded calls of one separate-CFG generation (cond, uncond per step)."""
    steps = [(calls[i], calls[i + 1]) for i in range(0, len(calls) - 1, 2)]
    sums = dict.fromkeys(COEFFICIENTS, 0.0)
    x_sum = 0.0
    attn_keys = [k for k in steps[0][0] if k.startswith("attn")]
    for i in range(max(warm, 2), len(steps)):
        (c, u), (c1, u1), (c2, u2) = steps[i], steps[i - 1], steps[i - 2]
        x_sum += _rel(c["temb"], c1["temb"])
        sums["step"] += max(_rel(c1["out"], c["out"]), _rel(u1["out"], u["out"]))
        sums["step_extrapolated"] += max(_rel(2 * b1["out"] - b2["out"], b["out"]) for b, b1, b2 in ((c, c1, c2), (u, u1, u2)))
        sums["cfg"] += _rel(u1["out"] - c1["out"], u["out"] - c["out"])
        sums["block"] += max(_rel(c1["res"], c["res"]), _rel(u1["res"], u["res"]))
        if attn_keys:
            sums["attn"] += max(sum(_rel(b1[k], b[k]) for k in attn_keys) / len(attn_keys) for b, b1 in ((c, c1), (u, u1)))
    return {q: v / max(x_sum, 1e-12) for q, v in sums.items()}


def coefficients(r: dict[str, float]) -> dict[str, float]:
    base = SENSITIVITY["step"] * r["step"]
    return {q: SENSITIVITY[q] * r[q] / base for q in COEFFICIENTS}


def savings(pipe: Any, call_kwargs: dict[str, Any], fn: int, bn: int) -> dict[str, float]:
    """FLOP shares of the middle blocks and of the self-attention modules in one call."""
    from torch.utils.flop_counter import FlopCounterMode


    model = pipe.transformer
    block_list = find_blocks(model)
    n = len(block_list)
    list_name = next(name for name, child in model.named_children() if child is block_list)
    captured: list[tuple[tuple, dict]] = []

    def keep(module: Any, args: tuple, kwargs: dict) -> None:
        if not captured:
            captured.append((args, kwargs))

    handle = model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(prompt=CALIBRATION_PROMPTS[0], generator=torch.Generator().manual_seed(0), **{**call_kwargs, "num_inference_steps": 1})
    finally:
        handle.remove()
    # One call under the counter from the outside, so its module tracker names every block.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*captured[0][0], **captured[0][1])
    counts = {name: sum(per_op.values()) for name, per_op in counter.get_flop_counts().items()}
    total = [counter.get_total_flops()]
    prefix = type(model).__name__
    blocks = sum(counts.get(f"{prefix}.{list_name}.{g}", 0) for g in range(fn, n - bn))
    attn = sum(counts.get(f"{prefix}.{list_name}.{g}.attn1", 0) for g in range(n))
    return {"block": blocks / total[0], "attn": attn / total[0]}


def _mean_psnr(pipe: Any, threshold: float, calib: dict[str, Any], samples: Sequence[tuple[str, int]], refs: list[torch.Tensor],
               call_kwargs: dict[str, Any], candidates: tuple[str, ...]) -> tuple[float, float]:
    import mixcache_compile

    from .metrics import psnr

    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"mixcache-calib-{os.getpid()}.json"
    path.write_text(json.dumps(calib))
    work = copy.deepcopy(pipe)
    session = mixcache_compile.enable(work, policy="mixcache", engine="eager", calibration=str(path), threshold=threshold,
                                      candidates=candidates)
    values = []
    for (prompt, seed), ref in zip(samples, refs):
        session.reset()
        with torch.no_grad():
            out = work(prompt=prompt, generator=torch.Generator().manual_seed(seed), **call_kwargs).frames
        values.append(psnr(out, ref))
    path.unlink()
    return sum(values) / len(values), session.stats()["computed_fraction"]


def fit(pipe: Any, call_kwargs: dict[str, Any], target_psnr: float, *, samples: Sequence[tuple[str, int]] | None = None,
        fn: int = 1, bn: int = 1, search_steps: int = 3, damping: float | None = None, log: Any = print) -> dict[str, Any]:
    """The whole calibration (module docstring); returns the dict ``load_budget`` reads.
    ``damping`` (the step extrapolation's, e.g. from the schedule simulator) is written into
    the file and used by the threshold search, so the threshold is found for the policy as it
    will run; None leaves the policy's default."""
    from ..policies.calibration import BUDGET_FORMAT

    samples = list(samples or [(p, s) for p in CALIBRATION_PROMPTS for s in CALIBRATION_SEEDS])
    recorder = _Recorder(pipe.transformer, fn, bn)
    refs, r_all = [], []
    try:
        for prompt, seed in samples:
            recorder.calls = []
            with torch.no_grad():
                refs.append(pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **call_kwargs).frames)
            r_all.append(rates(recorder.calls))
    finally:
        recorder.remove()
    r = {q: sum(d[q] for d in r_all) / len(r_all) for q in COEFFICIENTS}
    from ..policies.fingerprint import fingerprint

    # The sampler's timesteps of the calibration run: the time coordinate of the policy's
    # step extrapolation (mixcache.py, item 5), interpolated for other step counts.
    scheduler = getattr(pipe, "scheduler", None)
    timesteps = [float(t) for t in getattr(scheduler, "timesteps", [])] if scheduler is not None else []
    calib: dict[str, Any] = {
        "fingerprint": fingerprint(pipe.transformer), "timesteps": timesteps,
        "format": BUDGET_FORMAT, "k": coefficients(r), "rates": r, "sensitivity": SENSITIVITY,
        "savings": savings(pipe, call_kwargs, fn, bn), "rescale": [1.0, 0.0], "threshold": 0.0,
        "target_psnr": target_psnr, "samples": [list(s) for s in samples], "steps": call_kwargs.get("num_inference_steps"),
    }
    if damping is not None:
        calib["damping"] = damping
    log(f"rates {r}\ncoefficients {calib['k']}\nsavings {calib['savings']}")

    def measure(threshold: float, candidates: tuple[str, ...]) -> tuple[float, float]:
        quality, fraction = _mean_psnr(pipe, threshold, calib, samples, refs, call_kwargs, candidates)
        log(f"threshold {threshold:.4g} candidates {'+'.join(candidates)}: {quality:.2f} dB at {fraction:.3f}")
        return quality, fraction

    step_only = ("step",)
    lo, hi, points = search(lambda t: measure(t, step_only), target_psnr, search_steps, start=0.04)
    # Price check (Note [price check]): a partial reuse keeps its rate-based coefficient only
    # if, added at the found threshold, its point lies above the step-only curve through the
    # bracketing points (more quality for the compute, or less compute for the quality);
    # otherwise it is priced out (k = PRICED_OUT; Note [priced out]: the policy then drops it).
    (q_lo, f_lo), (q_hi, f_hi) = points[lo], points.get(hi, points[lo])
    slope = (q_lo - q_hi) / (f_lo - f_hi) if abs(f_lo - f_hi) > 1e-9 else 0.0
    kept = []
    for q in ("cfg", "block", "attn"):
        if calib["savings"].get(q, 0.5) <= 0.0:
            continue
        quality, fraction = measure(lo, ("step", q))
        on_curve = q_lo + slope * (fraction - f_lo)
        if quality > on_curve:
            kept.append(q)
        else:
            calib["k"][q] = PRICED_OUT
    calib["price_check"] = {"kept": kept, "slope_db_per_fraction": slope}
    if kept:
        lo, hi, _ = search(lambda t: measure(t, ("step", *kept)), target_psnr, max(search_steps - 2, 1), start=lo)
    calib["threshold"] = lo
    return calib


def search(measure: Any, target: float, steps: int, start: float = 0.02) -> tuple[float, float, dict[float, tuple[float, float]]]:
    """Largest threshold with mean PSNR >= target: grow x2 until missed, then bisect (log scale)."""
    points: dict[float, tuple[float, float]] = {}
    lo, hi = 0.0, start
    while hi < 5.0:
        points[hi] = measure(hi)
        if points[hi][0] < target:
            break
        lo, hi = hi, hi * 2
    if lo == 0.0:  # even the start misses: halve down
        while hi > 1e-4:
            hi /= 2
            points[hi] = measure(hi)
            if points[hi][0] >= target:
                lo, hi = hi, hi * 2
                break
    for _ in range(steps):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        points[mid] = measure(mid)
        lo, hi = (mid, hi) if points[mid][0] >= target else (lo, mid)
    if lo not in points:
        points[lo] = measure(lo)
    return lo, hi, points
