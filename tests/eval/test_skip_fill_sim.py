"""tools/skip_fill_sim.py: the default fill is the simulator's rule, and the other fills do
what their docstring says (checked against independent hand-written sampling loops)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools"))

from skip_fill_sim import Fill, FillSimulator  # noqa: E402

STEPS = 10
SCHEDULE = "FSSFSFSSFS"  # gaps of 2 and 1 steps, a trailing skip
COMPUTED = [i for i, letter in enumerate(SCHEDULE) if letter == "F"]


@pytest.fixture(scope="module")
def sim() -> FillSimulator:
    torch.set_num_threads(1)
    return FillSimulator("tiny", [("red circle moving left", 7)], steps=STEPS, damping=0.25)


def hand_loop(sim: FillSimulator, fill_v, shift=None) -> torch.Tensor:
    """A sampling loop written from the scheduler's convention: ``x_next = x + (s_next - s) v``.

    ``fill_v(i, computed, x)`` gives the CFG-combined velocity of a skipped step from the list of
    computed (step, x, v); ``shift(i, computed)`` (optional) a sample offset added after the
    Euler step of a computed step.
    """
    s = sim.samples[0]
    x = s.latents.clone()
    sig = [float(v) for v in sim.pipe.scheduler.sigmas]
    computed: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for i in range(STEPS):
        if SCHEDULE[i] == "F":
            t = torch.tensor([sim.timesteps[i]])
            with torch.no_grad():
                c = sim.pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=s.cond, return_dict=False)[0]
                u = sim.pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=s.uncond, return_dict=False)[0]
            v = u + sim.guidance * (c - u)
            computed.append((i, x, v))
            x = x + (sig[i + 1] - sig[i]) * v
            if shift is not None:
                x = x + shift(i, computed)
        else:
            x = x + (sig[i + 1] - sig[i]) * fill_v(i, computed, x)
    return x.clamp(-1.0, 1.0)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, atol=2e-5, rtol=1e-4))


def test_default_fill_is_the_simulator_rule(sim: FillSimulator) -> None:
    sim.fill = None
    base = sim.run_sample(0, SCHEDULE)
    sim.fill = Fill()
    assert torch.equal(sim.run_sample(0, SCHEDULE), base)
    sim.fill = Fill(damping=1.0)  # a different damping changes the result
    assert not torch.equal(sim.run_sample(0, SCHEDULE), base)


def test_x0_and_noise_holds_equal_the_velocity_hold(sim: FillSimulator) -> None:
    # Euler on a flow-matching schedule moves along the line from x0_hat to noise_hat, so
    # holding either estimate holds the velocity (the reason the report lists them as one row).
    outs = []
    for q in ("v", "x0", "noise"):
        sim.fill = Fill(quantity=q, damping=math.inf)
        outs.append(sim.run_sample(0, SCHEDULE))
    assert close(outs[0], outs[1]) and close(outs[0], outs[2])
    ref = hand_loop(sim, lambda i, comp, x: comp[-1][2])
    assert close(outs[0], ref)


def test_x0_extrapolation_against_a_hand_loop(sim: FillSimulator) -> None:
    sig = [float(v) for v in sim.pipe.scheduler.sigmas]
    cs = sim.timesteps

    def fill_v(i, comp, x):
        (i1, x1, v1), (i2, x2, v2) = comp[-2:] if len(comp) > 1 else (comp[-1], comp[-1])
        x0_2 = x2 - sig[i2] * v2
        if i1 == i2:
            return (x - x0_2) / sig[i]
        x0_1 = x1 - sig[i1] * v1
        w = (cs[i] - cs[i2]) / (cs[i2] - cs[i1]) / (1.0 + 0.5 * (i - i2 - 1))
        return (x - (x0_2 + w * (x0_2 - x0_1))) / sig[i]

    sim.fill = Fill(quantity="x0", damping=0.5)
    assert close(sim.run_sample(0, SCHEDULE), hand_loop(sim, fill_v))


def test_x0_keeping_corrector_against_a_sample_shift(sim: FillSimulator) -> None:
    # The corrector folded into the computed step's outputs equals shifting the sample after
    # that step by beta * delta * sigma_next / sigma_i2, delta = sum_k h_k (v_interp(k) - v_hold).
    sig = [float(v) for v in sim.pipe.scheduler.sigmas]
    beta = 0.5

    def shift(i2, comp):
        if len(comp) < 2 or comp[-2][0] == i2 - 1:
            return torch.zeros_like(comp[-1][2])
        (i1, _, v1), (_, _, v2) = comp[-2:]
        delta = sum((sig[k + 1] - sig[k]) * ((k - i1) / (i2 - i1)) * (v2 - v1) for k in range(i1 + 1, i2))
        return beta * delta * sig[i2 + 1] / sig[i2]

    sim.fill = Fill(coord="index", damping=math.inf, correct=beta, keep_x0=True)
    got = sim.run_sample(0, SCHEDULE)
    assert close(got, hand_loop(sim, lambda i, comp, x: comp[-1][2], shift))
    sim.fill = Fill(coord="index", damping=math.inf)
    assert not close(got, sim.run_sample(0, SCHEDULE))
