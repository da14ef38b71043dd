"""FasterCache settings on the tuning samples: ``mixcache calibrate``'s two prompts x seeds 7, 8, 9
(none of them in ``mixcache frontier``'s held-out sets), 50 steps, CFG 5, eager, 1 thread.

Usage:
  PYTHONPATH=. python tools/fastercache_tune.py --model tiny [--variants defaults,ci3_a0_c02] [--out F.json]

Prints mean / min PSNR, SSIM and computed fraction per setting (the frontier's ``run``: same
reference, same FLOP count). A setting picked here is then checked on the held-out sets with
``mixcache frontier --methods fastercache [--prompt-set fresh]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from mixcache_compile.eval.budget_fit import CALIBRATION_PROMPTS, TUNING_SEEDS
from mixcache_compile.eval.frontier import _ours, run

NO_BOOST = {"alpha_low": 0.0, "alpha_high": 0.0}
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "ci4_a0": {"cfg_interval": 4, **NO_BOOST},
    "attn_w0": {"attn_weight": 0.0},
    "no_cfg": {"cfg_window": None},
    "no_attn_ci2": {"attn_window": None, "cfg_interval": 2},
    "compound": {"boost": "compound"},
    "ci3_a0": {"cfg_interval": 3, **NO_BOOST},
    "ci3_c02": {"cfg_interval": 3, "cfg_window": (0.2, 1.0)},
    "ci3_a0_c01": {"cfg_interval": 3, "cfg_window": (0.1, 1.0), **NO_BOOST},
    "ci3_a0_c015": {"cfg_interval": 3, "cfg_window": (0.15, 1.0), **NO_BOOST},
    "ci3_a0_c02": {"cfg_interval": 3, "cfg_window": (0.2, 1.0), **NO_BOOST},
    "ci3_a0_c02_w05": {"cfg_interval": 3, "cfg_window": (0.2, 1.0), "attn_weight": 0.5, **NO_BOOST},
    "ci4_a0_c02": {"cfg_interval": 4, "cfg_window": (0.2, 1.0), **NO_BOOST},
    "cfgonly_ci3_c01": {"attn_window": None, "cfg_interval": 3, "cfg_window": (0.1, 1.0), **NO_BOOST},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "deep"), default="tiny")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    weights = None if a.model == "tiny" else Path(__file__).resolve().parents[1] / "mixcache_compile/zoo/weights/deep"
    samples = [(prompt, seed) for prompt in CALIBRATION_PROMPTS for seed in TUNING_SEEDS]
    points = [_ours("fastercache", name, **VARIANTS[name]) for name in names]
    results = run(points, samples, 50, 5.0, weights, time_repeats=0, log=lambda s: print(s, flush=True))
    if a.out is not None:
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
