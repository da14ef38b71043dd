"""fastercache: equals an independent eager reference call by call (separate and batched CFG,
paper and compound weights); the frequency rebuild equals the paper's two-difference form;
it runs through WanPipeline (separate branch calls), where diffusers' FasterCache fails."""

from __future__ import annotations

import pytest
import torch

from mixcache_compile import CacheSession
from mixcache_compile.policies.frequency import rebuild_from_delta
from tests.eager_reference import two_stream_adapter, wan_adapter
from tests.policies.harness import drive_batched, drive_separate
from tests.policies.reference import Reference
from tests.tiny_models import cogvideox, wan

STEPS = 14
ALL = "attn:0,1,2"


# ---- the paper's CFG-Cache, written with explicit shifts and two stored differences -----------------
def _split(x: torch.Tensor, divisor: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Low / high parts of the centred spectrum of each (H, W) frame (the paper's masks)."""
    spec = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))
    h, w = x.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disc = (xx - w // 2) ** 2 + (yy - h // 2) ** 2 <= (min(h, w) // divisor) ** 2
    return spec * disc, spec * ~disc


def paper_rebuild(cond: torch.Tensor, uncond_ref: torch.Tensor, cond_ref: torch.Tensor, w1: float, w2: float) -> torch.Tensor:
    """eps_u = IFFT(low(FFT(c)) + w1*dLF + high(FFT(c)) + w2*dHF), dLF/dHF from a full step."""
    lu, hu = _split(uncond_ref)
    lc, hc = _split(cond_ref)
    low, high = _split(cond)
    total = low + w1 * (lu - lc) + high + w2 * (hu - hc)
    return torch.fft.ifft2(torch.fft.ifftshift(total, dim=(-2, -1))).real.to(cond.dtype)


def test_frequency_rebuild_is_the_papers_two_difference_form():
    g = torch.Generator().manual_seed(0)
    c, c_ref, u_ref = (torch.randn(2, 4, 3, 12, 10, generator=g) for _ in range(3))
    for w1, w2 in ((1.2, 1.0), (1.0, 1.2), (1.331, 0.9)):
        got = rebuild_from_delta(c, u_ref - c_ref, w1, w2, divisor=5)
        torch.testing.assert_close(got, paper_rebuild(c, u_ref, c_ref, w1, w2), rtol=0, atol=1e-5)
    torch.testing.assert_close(rebuild_from_delta(c, u_ref - c_ref, 1.0, 1.0, 5), c + u_ref - c_ref)
    # No spatial layout (packed tokens): the whole difference takes the low-frequency weight.
    flat = torch.randn(2, 16, 8, generator=g)
    torch.testing.assert_close(rebuild_from_delta(flat, flat, 1.5, 1.0, 5), flat * 2.5)


# ---- the reference's decision rule (from the module docstring, not the code) ------------------------
class FasterRule:
    def __init__(self, steps: int, attn_from: float, cfg_from: float, mode: str, alpha: float, windows) -> None:
        self.steps, self.mode, self.alpha = steps, mode, alpha
        self.attn = [i for i in range(steps) if i >= attn_from * steps]
        self.cfg = [i for i in range(steps) if i >= cfg_from * steps]
        self.low_window, self.high_window = windows
        self.last_attn: dict[str, int] = {}
        self.skipped: list[int] = []
        self.full_pair: dict[str, torch.Tensor] = {}  # branch outputs of the last step computing both

    def _phase(self, step):
        return None if step not in self.cfg else (step - self.cfg[0]) % 5

    def action(self, step, branch, computed):
        phase = self._phase(step)
        if phase and (branch == "batch" or (branch == "uncond" and "cond" in computed)):
            half = self.last_attn.get("half")
            if branch == "batch" and step in self.attn and half is not None and step - half == 1:
                return "cfg+" + ALL  # the composite: the computed cond half reuses attention
            return "cfg"
        last = self.last_attn.get(branch)
        if phase != 0 and step in self.attn and last is not None and step - last == 1:
            return ALL
        return "full"

    def observe(self, step, branch, result):
        if result.action == "full":
            self.last_attn[branch] = step
        if branch == "batch" and result.action in ("full", "cfg"):
            self.last_attn["half"] = step
        if result.action.startswith("cfg"):
            self.skipped.append(step)
        elif branch in ("uncond", "batch"):
            self.skipped = []

    def weights(self, step):
        if self.mode == "paper":
            return 1 + self.alpha * (step in self.low_window), 1 + self.alpha * (step in self.high_window)
        w1 = w2 = 1.0
        for j in self.skipped + [step]:
            w1 *= 1 + self.alpha * (j in self.low_window)
            w2 *= 1 + self.alpha * (j in self.high_window)
        return w1, w2

    def rebuild(self, step, branch):
        w1, w2 = self.weights(step)
        return lambda c, d: paper_rebuild(c, d, torch.zeros_like(d), w1, w2)

    def attn_value(self, step, branch):
        start = self.attn[0]
        w = min(max((step - start) / (self.steps - 1 - start), 0.0), 1.0)

        def extrapolate(block, last, prev):
            if prev is None:
                return last
            if isinstance(last, tuple):
                return tuple(a + w * (a - b) for a, b in zip(last, prev))
            return last + w * (last - prev)

        return extrapolate


def test_separate_cfg_paper_weights_match_reference():
    model, make = wan()
    t0 = 0.7
    session = CacheSession("fastercache", attn_window=(0.15, 1.0), cfg_window=(0.25, 1.0), t0=t0)
    low = {i for i in range(STEPS) if i < t0 * STEPS}
    rule = FasterRule(STEPS, 0.15, 0.25, "paper", 0.2, (low, set(range(STEPS)) - low))
    ref = Reference(model, wan_adapter(model), watch_attn=range(3))
    log = drive_separate(model, make, session, ref, rule, STEPS)
    by_branch = {b: [a for _, br, a in log if br == b] for b in ("cond", "uncond")}
    assert by_branch["uncond"].count("cfg") == 8  # window 4..13, refreshes at 4 and 9
    assert by_branch["cond"].count(ALL) >= 5 and by_branch["uncond"].count(ALL) >= 1
    assert not session.stats()["fallbacks"]


def test_batched_cfg_compound_weights_match_reference():
    model, make = cogvideox()
    low, high = set(range(2, 12)), set(range(9, STEPS))
    session = CacheSession("fastercache", cfg="batched", attn_window=(0.15, 1.0), cfg_window=(0.4, 1.0), boost="compound",
                           low_boost_window=low, high_boost_window=high)
    rule = FasterRule(STEPS, 0.15, 0.4, "compound", 0.1, (low, high))
    ref = Reference(model, two_stream_adapter(model), watch_attn=range(3), cond_half=True)
    log = drive_batched(model, make, session, ref, rule, STEPS)
    actions = [a for _, _, a in log]
    # attention alternates before the CFG window (3..5); inside it (6..13, refresh 6, 11) the
    # skipped steps compute the cond half only, which alternates its own attention reuse
    assert actions[3:6] == [ALL, "full", ALL]
    assert actions[6:14] == ["full", "cfg+" + ALL, "cfg", "cfg+" + ALL, "cfg", "full", "cfg+" + ALL, "cfg"]
    assert not session.stats()["fallbacks"]


def test_num_steps_fallback_and_validation():
    from mixcache_compile.policies import make_policy
    from mixcache_compile.policies.protocol import Observation

    policy = make_policy("fastercache", num_steps=9)
    assert policy.attention_weight(8, 9) == 1.0
    obs = Observation(step=4, num_steps=None, branch="uncond", cfg="separate", generation=0, computed_this_step=frozenset({"cond"}))
    policy.needs(__import__("mixcache_compile.policies.protocol", fromlist=["ModelInfo"]).ModelInfo(3, ((0, 3),), frozenset(), True, False))
    assert str(policy.decide(obs)) == "CFG"  # window (1/3, 1) of 9 steps = 3..8, refresh at 3
    for bad in ({"boost": "x"}, {"cfg_interval": 1}, {"attn_weight": "cubic"}, {"cfg_window": (0.9, 0.1)}, {"num_steps": 0}):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            make_policy("fastercache", **bad)


# ---- through WanPipeline (separate branch calls) -------------------------------------------------------
def _wan_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    model, _ = wan()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wan_call(pipe, steps):
    g = torch.Generator().manual_seed(100)
    return pipe(prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
                height=64, width=64, num_frames=5, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames


def test_wan_pipeline_separate_branches_runs_where_diffusers_fails():
    import mixcache_compile
    from diffusers import FasterCacheConfig

    steps = 15
    peer = _wan_pipe()
    peer.transformer.enable_cache(FasterCacheConfig(current_timestep_callback=lambda: peer.current_timestep, attention_weight_callback=lambda _: 0.5))
    with torch.no_grad(), pytest.raises(IndexError):
        _wan_call(peer, steps)  # diffusers 0.42.1 chunks the batch in two: no batch to split here

    pipe = _wan_pipe()
    with torch.no_grad():
        reference = _wan_call(pipe, steps)
    session = mixcache_compile.enable(pipe, policy="fastercache", engine="eager", num_steps=steps)
    with torch.no_grad():
        cached = _wan_call(pipe, steps)
    stats = session.stats()
    assert not stats["fallbacks"]
    # CFG window 5..14 with refreshes at 5 and 10; cond reuses attention at 6, 8, 11, 13
    assert stats["actions"]["CFG"] == 8 and stats["actions"]["ATTN"] == 4
    assert stats["computed_fraction"] < 0.8
    rel = ((cached - reference).abs().mean() / reference.abs().mean()).item()
    assert 0 < rel < 0.2, rel
