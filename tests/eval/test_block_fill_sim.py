"""tools/block_fill_sim.py: a block step is the model with its middle blocks' residual held from
the last full step (checked against a hand-written loop that gets there through forward hooks)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))

from block_fill_sim import BlockSimulator  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def sim() -> BlockSimulator:
    torch.set_num_threads(1)
    return BlockSimulator("tiny", [("red circle moving left", 7)], steps=STEPS, damping=0.25)


def hand_loop(sim: BlockSimulator, schedule: str) -> torch.Tensor:
    """``F`` / ``B`` / ``C`` / ``S`` with every rule written out: the middle residual recorded by
    hooks at full calls, a block call's middle blocks replaced by hooks returning their input
    (plus the held residual at the first), skips extrapolated from the last two history points."""
    s, tr = sim.samples[0], sim.pipe.transformer
    a, b = 1, len(tr.blocks) - 1
    sched = sim.pipe.scheduler
    sched.set_timesteps(STEPS, device="cpu")
    sched.set_begin_index(0)
    x = s.latents.clone()
    residual: dict[str, torch.Tensor] = {}
    history: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def call(embeds: torch.Tensor, t: torch.Tensor, branch: str, block: bool) -> torch.Tensor:
        seen: dict[str, torch.Tensor] = {}
        hooks = []
        if block:
            hooks.append(tr.blocks[a].register_forward_hook(lambda m, args, out: args[0] + residual[branch]))
            for k in range(a + 1, b):
                hooks.append(tr.blocks[k].register_forward_hook(lambda m, args, out: args[0]))
        else:
            hooks.append(tr.blocks[a].register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0])))
            hooks.append(tr.blocks[b - 1].register_forward_hook(lambda m, args, out: seen.__setitem__("out", out)))
        try:
            with torch.no_grad():
                out = tr(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=embeds, return_dict=False)[0]
        finally:
            for h in hooks:
                h.remove()
        if not block:
            residual[branch] = seen["out"] - seen["in"]
        return out

    for i, t in enumerate(sched.timesteps):
        letter = schedule[i]
        if letter == "S":
            (i1, c1, u1), (i2, c2, u2) = history[-2], history[-1]
            w = sim.weight(i, [i1, i2])
            c, u = c2 + w * (c2 - c1), u2 + w * (u2 - u1)
        else:
            c = call(s.cond, t, "cond", letter != "F")
            u = call(s.uncond, t, "uncond", letter != "F")
            if letter in "FC":
                history = [*history, (i, c, u)][-2:]
        x = sched.step(u + sim.guidance * (c - u), t, x, return_dict=False)[0]
    return x.clamp(-1.0, 1.0)


def test_block_call_with_its_own_residual_is_the_full_call(sim: BlockSimulator) -> None:
    s, t = sim.samples[0], torch.tensor(sim.timesteps[3])
    full = sim._call(0, "test:F", "cond", s.latents, t)
    block = sim._block_call(0, "test:B", "cond", s.latents, t, sim._residuals[(0, "test:F", "cond")])
    assert torch.allclose(full, block, atol=1e-5), float((full - block).abs().max())


@pytest.mark.parametrize("schedule", ["FFBSFCSB", "FFCSSFBS"])
def test_schedule_matches_hand_written_loop(sim: BlockSimulator, schedule: str) -> None:
    ours = sim.run_sample(0, schedule)
    ref = hand_loop(sim, schedule)
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), float((ours - ref).abs().max())
    # and a block step is not a full step: the schedule differs from all-full
    assert not torch.allclose(ours, sim.samples[0].reference, atol=1e-3)
