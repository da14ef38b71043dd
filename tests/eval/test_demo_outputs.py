"""Metrics, the GIF/strip/timeline writers, and `mixcache demo` end to end on the shipped model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mixcache_compile.eval.metrics import psnr, ssim
from mixcache_compile.eval.timeline import plot_timeline
from mixcache_compile.eval.video_io import write_gif, write_strip
from mixcache_compile.runtime.session import TraceEntry


def _video(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_matches_its_definition():
    ref = _video()
    noisy = ref + 0.01 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    mse = ((noisy - ref) ** 2).mean().item()
    assert psnr(noisy, ref) == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-4)
    assert psnr(ref, ref) == float("inf")


def test_ssim_is_one_for_identical_and_drops_with_noise():
    ref = _video()
    assert ssim(ref, ref) == pytest.approx(1.0)
    noisy = ref + 0.3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    assert ssim(noisy, ref) < 0.9


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(_video()[:, :, :2], _video())


def test_gif_and_strip_hold_the_frames(tmp_path):
    video = _video()
    gif = Image.open(write_gif(video, tmp_path / "v.gif", scale=2))
    assert gif.n_frames == 4 and gif.size == (32, 32)
    strip = np.asarray(Image.open(write_strip({"a": video, "b": video}, tmp_path / "s.png", scale=1)))
    assert strip.shape == (16 * 2 + 2, 16 * 4, 3)


def test_timeline_draws_the_last_generation(tmp_path):
    trace = [TraceEntry(0, 0, "cond", "FULL", "FULL")] + [
        TraceEntry(1, s, b, "STEP" if s % 2 else "FULL", "STEP") for s in range(6) for b in ("cond", "uncond")
    ]
    path = plot_timeline(trace, tmp_path / "t.png")
    assert Image.open(path).size[0] > 100
    with pytest.raises(ValueError, match="empty trace"):
        plot_timeline([], tmp_path / "e.png")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from mixcache_compile.eval.demo import run_demo

    result = run_demo(steps=8, repeats=1, out=tmp_path, policy="static", policy_options={"every": 2, "warmup": 3})
    for path in result.files.values():
        assert (tmp_path / path.split("/")[-1]).exists()
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["policy"] == "static" and saved["actions"]["STEP"] > 0
    assert saved["session_summary"].startswith("mixcache session: policy static(every=2, warmup=3)")
    assert "calls 16, steps 8" in saved["session_summary"]  # the one timed generation: 8 steps x 2 branches
    assert 0.5 < result.computed_fraction < 1.0
    assert 10 < result.psnr_db < float("inf") and 0 < result.ssim <= 1
