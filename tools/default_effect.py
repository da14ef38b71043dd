"""What turning it on does: ``enable(pipe)`` with no policy, on every shipped model (README, #15).

For each model in ``zoo.MODELS``: the uncached video, the default (``enable(pipe)``, i.e.
``DEFAULT_POLICY`` at its calibrated defaults), and the default on an uncalibrated model: the
same weights nudged by 1e-6 (a stand-in for a fine-tune: its fingerprint matches no shipped
calibration, so the policy runs its conservative ``FALLBACK``), compared with that model's own
uncached video. Reports mean PSNR against the uncached video, the
computed fraction from ``stats()``, and, with ``--compiled``, the wall time of a generation
against plain ``torch.compile(fullgraph=True)`` (one process, interleaved, median of repeats).

    PYTHONPATH=. python tools/default_effect.py [--steps 50] [--compiled --repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from typing import Any

import torch

import mixcache_compile
from mixcache_compile.eval.metrics import psnr
from mixcache_compile.eval.timing import interleaved_medians
from mixcache_compile.policies import DEFAULT_POLICY
from mixcache_compile.policies.mixcache import FALLBACK
from mixcache_compile.zoo import MODELS, default_call_kwargs, load_pipeline

# Held out from calibration (calibration used "red circle moving left", seed 7).
SAMPLES = (("blue square moving down", 1000), ("green circle moving up", 1000))


def _generate(pipe: Any, prompt: str, seed: int, steps: int) -> torch.Tensor:
    with torch.no_grad():
        return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed),
                    **default_call_kwargs(num_inference_steps=steps, guidance_scale=5.0)).frames


def _quality(base: Any, make: Callable[[Any], Any], refs: list[torch.Tensor], steps: int) -> dict[str, Any]:
    pipe = copy.deepcopy(base)
    session = make(pipe)
    calibrated = None  # which coefficients mixcache runs: a shipped calibration, or the fallback
    if session.policy.name == "mixcache":
        calibrated = session.policy.threshold != FALLBACK["threshold"] or session.policy.k != FALLBACK["k"]
    outs = []
    for prompt, seed in SAMPLES:
        outs.append(_generate(pipe, prompt, seed, steps))  # each generation starts from a clean cache
    fraction = session.stats()["computed_fraction"]  # over all samples (counters are not reset)
    per = [psnr(o, r) for o, r in zip(outs, refs)]
    return {"psnr": sum(per) / len(per), "psnr_min": min(per), "computed_fraction": fraction,
            "policy": session.summary().splitlines()[0], "calibrated": calibrated}


def _nudged(base: Any) -> Any:
    """The pipeline with every transformer weight moved by 1e-6: no shipped calibration matches."""
    pipe = copy.deepcopy(base)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(1e-6)
    return pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--compiled", action="store_true", help="also time inductor against plain torch.compile")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in MODELS:
        base = load_pipeline(name=name)
        base.set_progress_bar_config(disable=True)
        nudged = _nudged(base)
        for case, pipe in ((f"default ({DEFAULT_POLICY})", base), ("uncalibrated (weights nudged)", nudged)):
            refs = [_generate(pipe, prompt, seed, args.steps) for prompt, seed in SAMPLES]
            quality = _quality(pipe, lambda p: mixcache_compile.enable(p, engine="eager"), refs, args.steps)
            row = {"model": name, "case": case, **quality}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.compiled:
            plain = copy.deepcopy(base)
            plain.transformer = torch.compile(plain.transformer, fullgraph=True)
            ours = copy.deepcopy(base)
            mixcache_compile.enable(ours, engine="inductor")
            prompt, seed = SAMPLES[0]
            fns = {"plain": lambda: _generate(plain, prompt, seed, args.steps),
                   "default": lambda: _generate(ours, prompt, seed, args.steps)}
            med = interleaved_medians(fns, repeats=args.repeats, warmup=1)
            row = {"model": name, "case": "compiled speed", "speedup_vs_plain_compile": med["plain"] / med["default"],
                   "plain_s": med["plain"], "default_s": med["default"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
