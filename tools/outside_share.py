"""How much of a generation happens outside the transformer, on a shipped model.

The pipeline runs once with its transformer under plain ``torch.compile`` and once with a
stand-in that returns zeros of the input's shape at once (everything else unchanged: text
encoder, scheduler, CFG combination and the decode, a clamp: the shipped models have no VAE),
interleaved, medians.
The difference is what any transformer cache can save at most per generation; the stand-in's
time is what none can.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/outside_share.py [--model tiny] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from mixcache_compile.zoo import default_call_kwargs, load_pipeline


class ZeroTransformer(torch.nn.Module):
    """Answers every call with zeros shaped like ``hidden_states``; reads like the real one."""

    def __init__(self, real: torch.nn.Module) -> None:
        super().__init__()
        self.real = real
        self.config = real.config

    @property
    def dtype(self) -> torch.dtype:
        return self.real.dtype

    @property
    def device(self) -> torch.device:
        return self.real.device

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        return (torch.zeros_like(hidden_states),)

    def cache_context(self, *args: Any, **kwargs: Any) -> Any:
        return self.real.cache_context(*args, **kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(name=a.model)
    pipe.set_progress_bar_config(disable=True)
    transformers = {"compiled": torch.compile(pipe.transformer), "zeros": ZeroTransformer(pipe.transformer)}

    def generate(which: str) -> float:
        pipe.transformer = transformers[which]
        start = time.perf_counter()
        with torch.no_grad():
            pipe(prompt="red circle moving down", generator=torch.Generator().manual_seed(3000),
                 **default_call_kwargs(num_inference_steps=50))
        return time.perf_counter() - start

    for which in transformers:  # the compile, and warm caches: untimed
        generate(which)
    times: dict[str, list[float]] = {which: [] for which in transformers}
    for r in range(a.repeats):
        for which in (("zeros", "compiled") if r % 2 == 0 else ("compiled", "zeros")):
            times[which].append(generate(which))
    compiled, zeros = (statistics.median(times[w]) for w in ("compiled", "zeros"))
    print(f"{a.model}: generation {compiled * 1e3:.0f} ms under plain torch.compile, {zeros * 1e3:.0f} ms of it "
          f"outside the transformer ({100 * zeros / compiled:.1f}%)")


if __name__ == "__main__":
    main()
