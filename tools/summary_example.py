"""Print ``session.summary()`` for one generation of the shipped model (the README's example).

    PYTHONPATH=. python tools/summary_example.py [--steps 20] [--threshold 0.1] [--warmup 2]
"""

from __future__ import annotations

import argparse

import torch

import mixcache_compile
from mixcache_compile import FbCacheConfig
from mixcache_compile.zoo import default_call_kwargs, load_pipeline


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    session = mixcache_compile.enable(pipe, FbCacheConfig(threshold=args.threshold, warmup=args.warmup), engine="eager")
    with torch.no_grad():
        pipe(prompt="red circle moving left", generator=torch.Generator().manual_seed(0),
             **default_call_kwargs(num_inference_steps=args.steps))
    print(session.summary())


if __name__ == "__main__":
    main()
