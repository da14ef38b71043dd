"""tools/budget_spacing_eval.py: the offline schedule is the schedule the mixcache session runs."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))

from budget_spacing_eval import indicators, progress_weight, schedule  # noqa: E402

STEPS = 20


@pytest.fixture(scope="module")
def measured() -> dict:
    torch.set_num_threads(1)
    return indicators("tiny", steps=STEPS)


def computed_steps(threshold: float) -> list[int]:
    import mixcache_compile
    from mixcache_compile.zoo import default_call_kwargs, load_pipeline

    pipe = load_pipeline(name="tiny")
    pipe.set_progress_bar_config(disable=True)
    session = mixcache_compile.enable(pipe, policy="mixcache", engine="eager", threshold=threshold)
    with torch.no_grad():
        pipe(prompt="green square moving up", generator=torch.Generator().manual_seed(3),
             **default_call_kwargs(num_inference_steps=STEPS, guidance_scale=5.0))
    return sorted({e.step for e in session.trace if e.action == "FULL" and e.branch == "cond"})


@pytest.mark.parametrize("threshold", [0.08, 0.2])
def test_offline_schedule_is_the_sessions_on_another_prompt(measured: dict, threshold: float) -> None:
    offline = schedule(measured["x"], measured["k"], threshold)
    assert 2 < len(offline) < STEPS  # the threshold skips some steps and computes others
    assert offline == computed_steps(threshold)


def test_capped_weight_only_discounts_early_steps() -> None:
    w = progress_weight(0.1, 0.5)
    assert w(0, 51) == pytest.approx(0.1 / 0.6) and w(25, 51) == 1.0 and w(50, 51) == 1.0
    x, k = [float("inf")] + [0.01] * 19, {"step": 1.0, "step_extrapolated": 1.0}
    assert schedule(x, k, 0.035)[1] < schedule(x, k, 0.035, w)[1]  # the first gap grows
