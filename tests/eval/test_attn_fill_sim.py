"""tools/attn_fill_sim.py: an attention step is what the runtime's ATTN action computes (the
shipped pipeline under ``static`` with ATTN on every block is the independent reference), and
its cost share gives the computed fraction the runtime counts."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))

import mixcache_compile  # noqa: E402
from attn_fill_sim import AttnSimulator, attn_step_share, build, cost  # noqa: E402
from mixcache_compile.zoo import default_call_kwargs, load_pipeline  # noqa: E402

STEPS = 8
SAMPLE = ("red circle moving left", 7)


@pytest.fixture(scope="module")
def sim() -> AttnSimulator:
    torch.set_num_threads(1)
    return AttnSimulator("tiny", [SAMPLE], steps=STEPS, damping=0.25)


def runtime_video(attn_steps: tuple[int, ...]) -> tuple[torch.Tensor, float]:
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    every_block = "attn:" + ",".join(str(k) for k in range(len(pipe.transformer.blocks)))
    session = mixcache_compile.enable(pipe, policy="static", schedule={i: every_block for i in attn_steps}, engine="eager")
    with torch.no_grad():
        video = pipe(prompt=SAMPLE[0], generator=torch.Generator().manual_seed(SAMPLE[1]),
                     **default_call_kwargs(num_inference_steps=STEPS)).frames
    assert session.stats()["actions"]["ATTN"] == 2 * len(attn_steps)
    return video, session.stats()["computed_fraction"]


def test_attention_steps_equal_the_runtimes_attn_action(sim):
    schedule = build(STEPS, {"F": [0, 1, 2, 4, 5, 6], "A": [3, 7]})
    assert schedule == "FFFAFFFA"
    want, fraction = runtime_video((3, 7))
    got = sim.run_sample(0, schedule)
    assert (got - want).abs().max().item() <= 1e-5
    # without the replay the two differ: the attention step is not a full step in disguise
    assert (sim.run_sample(0, "F" * STEPS) - want).abs().max().item() > 1e-3
    # the cost model counts what the runtime's stage FLOPs count
    assert cost(schedule, attn_step_share(sim)) == pytest.approx(fraction, rel=1e-9)


def test_the_composite_letter_rebuilds_the_uncond_from_the_extrapolated_difference(sim):
    schedule = build(STEPS, {"F": [0, 1, 2, 3, 4, 5, 6], "G": [7]})
    h = build(STEPS, {"F": [0, 1, 2, 3, 4, 5, 6], "H": [7]})
    a = build(STEPS, {"F": [0, 1, 2, 3, 4, 5, 6], "A": [7]})
    g_video, h_video, a_video = (sim.run_sample(0, s) for s in (schedule, h, a))
    # G's cond is A's cond and its uncond is H's rule applied to that cond: all three differ
    assert (g_video - h_video).abs().max().item() > 1e-4 and (g_video - a_video).abs().max().item() > 1e-4
    assert cost(schedule, 0.6) == pytest.approx((7 + 0.3) / 8)
