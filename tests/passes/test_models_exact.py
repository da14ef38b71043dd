"""Policy ``none`` on tiny real diffusers DiTs: fullgraph compiles and equals eager."""

from __future__ import annotations

import pytest
import torch

from mixcache_compile import CacheSession
from tests.tiny_models import MODELS

# model -> (chain list paths, blocks per chain)
EXPECTED_CHAINS = {
    "wan": (["blocks"], [3]),
    "cogvideox": (["transformer_blocks"], [3]),
    "hunyuan_video": (["transformer_blocks", "single_transformer_blocks"], [2, 2]),
    "flux": (["transformer_blocks", "single_transformer_blocks"], [2, 2]),
    "pixart": (["transformer_blocks"], [3]),
    "sd3": (["transformer_blocks"], [3]),
    "ltx_video": (["transformer_blocks"], [3]),
}


def _run(name: str, engine: str, batch: int):
    model, make = MODELS[name]()
    session = CacheSession("none")
    options = {"session": session, "engine": engine}
    if getattr(type(model), "_repeated_blocks", None):
        options["repeated_blocks"] = list(type(model)._repeated_blocks)
    compiled = torch.compile(model, backend="mixcache", options=options, fullgraph=True)
    errors = []
    with torch.no_grad():
        for seed in (0, 1):
            kwargs = make(batch, seed=seed, t=700.0 - 300 * seed)
            errors.append((compiled(**kwargs)[0] - model(**kwargs)[0]).abs().max().item())
    return session, errors


def _check_plan(session: CacheSession, name: str) -> None:
    runner = session._runner
    assert runner is not None, "the graph was not planned (fell back to plain compilation)"
    paths, counts = EXPECTED_CHAINS[name]
    assert runner.plan.chain_names == paths
    assert [len(c) for c in runner.plan.chains] == counts
    assert session.stats()["computed_fraction"] == 1.0
    # Every block of every chain can be skipped as a range of one.
    assert all((g, g + 1) in runner.model_info.reusable_ranges for g in range(runner.model_info.num_blocks))


# Batch 1 runs on the inductor engine below and batch 2 (both CFG branches in one batch) on the
# eager engine here, to the tighter tolerance: each family is traced twice, not three times.
@pytest.mark.parametrize("name", sorted(MODELS))
def test_none_policy_equals_eager(name: str):
    session, errors = _run(name, "eager", 2)
    assert max(errors) <= 1e-5
    _check_plan(session, name)


# The inductor engine on Wan (separate CFG calls, the shipped models' class) and CogVideoX
# (batch-concatenated CFG, text joined to the video tokens) in ``make test``; the other
# families (their plans are checked above on the eager engine, and the engine compiles
# stages the same way whatever the chains) carry ``sweep_all``, which ``make test-all``
# runs: with a cold inductor cache one compile is 40-90 s of a 15-minute suite.
INDUCTOR_IN_MAKE_TEST = ("cogvideox", "wan")


@pytest.mark.inductor
@pytest.mark.parametrize("name", [n if n in INDUCTOR_IN_MAKE_TEST else pytest.param(n, marks=pytest.mark.sweep_all)
                                  for n in sorted(MODELS)])
def test_none_policy_equals_eager_inductor(name: str):
    session, errors = _run(name, "inductor", 1)
    assert max(errors) <= 1e-4
    _check_plan(session, name)
    runner = session._runner
    # Structurally equal blocks share compiled code: far fewer compiles than stages.
    distinct = {b.stage.key for b in runner.blocks}
    assert runner.engine.compiles <= 2 + len(distinct) + len(runner.plan.glue)
