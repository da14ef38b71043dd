"""Rank-consistent decisions, the workload: each rank of two gloo processes runs a loop on its own
shard of the sequence (run by ``cp_worker.main``, checked in tests/runtime/test_context_parallel.py)."""

from __future__ import annotations

import torch

from mixcache_compile import CacheSession
from mixcache_compile.policies.protocol import FULL, PROBE, Action, ActionKind, CacheNeeds, Probe
from tests.tiny_models import wan


class ThresholdProbe:
    name = "threshold-probe"

    def __init__(self, threshold: float = 0.05) -> None:
        self.threshold = threshold

    def needs(self, model):
        return CacheNeeds(ranges={(1, 3)}, probe=Probe("blocks", blocks=1))

    def decide(self, obs):
        return PROBE if obs.step >= 1 else FULL

    def after_probe(self, obs, indicator):
        return Action(ActionKind.BLOCK, block_range=(1, 3)) if indicator < self.threshold else FULL

    def reset(self):
        pass


def run_loop(rank: int) -> list[dict]:
    """A 6-step loop on this rank's shard (frames 2r, 2r+1 of a 4-frame latent)."""
    torch.set_num_threads(1)
    torch._dynamo.reset()
    model, make = wan()
    session = CacheSession(ThresholdProbe())
    compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"}, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(1, 4, 4, 8, 8, generator=g)
    text = torch.randn(1, 5, 16, generator=g)
    shard = full[:, :, 2 * rank: 2 * rank + 2]
    with torch.no_grad():
        for step in range(6):
            x = shard * (1 - 0.03 * step) + 0.01 * rank * step
            with session.context("cond", step_index=step):
                compiled(hidden_states=x, timestep=torch.tensor([900.0 - 60 * step]), encoder_hidden_states=text, return_dict=False)
    return [{"step": e.step, "action": e.action, "indicator": e.indicator} for e in session.trace]

