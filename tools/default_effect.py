"""What turning it on does: ``enable(pipe)`` with no policy, on every shipped model (README, #15).

For each model in ``zoo.MODELS``: the uncached video, the default (``enable(pipe)``, i.e.
``DEFAULT_POLICY`` at its calibrated defaults), and the same policy with the fallback
coefficients an uncalibrated model gets. Reports mean PSNR against the uncached video, the
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
from mixcache_compile.policies.mixcache import FALLBACK, MixCacheConfig
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
    outs = []
    for prompt, seed in SAMPLES:
        outs.append(_generate(pipe, prompt, seed, steps))  # each generation starts from a clean cache
    fraction = session.stats()["computed_fraction"]  # over all samples (counters are not reset)
    per = [psnr(o, r) for o, r in zip(outs, refs)]
    return {"psnr": sum(per) / len(per), "psnr_min": min(per), "computed_fraction": fraction,
            "policy": session.summary().splitlines()[0]}


def _fallback_config() -> MixCacheConfig:
    return MixCacheConfig(calibration=FALLBACK)  # what a model without calibration runs


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
        refs = [_generate(base, prompt, seed, args.steps) for prompt, seed in SAMPLES]
        cases = {
            f"default ({DEFAULT_POLICY})": lambda pipe: mixcache_compile.enable(pipe, engine="eager"),
            "uncalibrated (fallback)": lambda pipe: mixcache_compile.enable(pipe, _fallback_config(), engine="eager"),
        }
        for case, make in cases.items():
            row = {"model": name, "case": case, **_quality(base, make, refs, args.steps)}
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
