"""Cross-checks against diffusers' own hooks on a batched-CFG pipeline (tiny CogVideoX through
CogVideoXPipeline, vae=None, prompt embeddings given): with matching settings both skip the
same calls, and the final latents agree within ``PEER_TOL``.

Why ``PEER_TOL = 1e-4`` (max absolute difference of the final latents, which are of unit
scale): the decisions are identical (asserted call by call) and the arithmetic is the same up
to float32 evaluation order. FirstBlockCache vs fbcache is bit-identical (measured 0.0).
FasterCache vs fastercache differs only in how the uncond half is rebuilt: diffusers keeps
two spectra, low(FFT(u)) - low(FFT(c)) and the high part, and adds them to the split spectrum
of c before one inverse FFT; this policy takes one FFT of u - c and adds its inverse to c.
Each rebuild differs by FFT round-off (~1e-7 relative), twelve rebuilt steps feed back
through the sampler: measured 2.3e-5. 1e-4 leaves 4x margin for BLAS/threading changes while
one differently decided call moves the latents by > 1e-2 (asserted below for FasterCache:
the uncached run differs by more than 100x the tolerance).

What is not compared: FasterCache's attention reuse. diffusers reuses attention only on calls
that also skip the uncond half (the cond half's attention, batch halved); this runtime runs
one action per call, so on batched CFG a skipped-uncond call never also reuses attention. The
peer runs below disable attention reuse on both sides (``spatial_attention_block_skip_range
=None`` / ``attn_window=None``); attention reuse is checked against the eager reference.
"""

from __future__ import annotations

import torch

import mixcache_compile
from mixcache_compile.policies.schedules import steps_in_timestep_window
from tests.tiny_models import cogvideox

STEPS = 20
PEER_TOL = 1e-4


def _pipe():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    model, _ = cogvideox()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe):
    g = torch.Generator().manual_seed(7)
    return pipe(prompt_embeds=torch.randn(1, 6, 16, generator=g), negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames


def _timesteps():
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler()
    scheduler.set_timesteps(STEPS)
    return scheduler.timesteps


def _record_batches(module: torch.nn.Module, sizes: list[int]):
    return module.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)


def test_fastercache_cfg_cache_matches_diffusers():
    from diffusers import FasterCacheConfig

    ts = _timesteps()
    # (-1, 701) starts the uncond window at step 5, a multiple of the period: diffusers counts
    # its period from step 0, this policy from the window start (see fastercache.py).
    cfg_window, low, high = (-1, 701), (99, 901), (-1, 301)
    peer = _pipe()
    sizes: list[int] = []
    _record_batches(peer.transformer.transformer_blocks[0], sizes)
    peer.transformer.enable_cache(FasterCacheConfig(
        spatial_attention_block_skip_range=None, unconditional_batch_skip_range=5,
        unconditional_batch_timestep_skip_range=cfg_window, low_frequency_weight_update_timestep_range=low,
        high_frequency_weight_update_timestep_range=high, alpha_low_frequency=1.1, alpha_high_frequency=1.1,
        tensor_format="BFCHW", current_timestep_callback=lambda: peer.current_timestep, attention_weight_callback=lambda _: 0.5,
    ))
    with torch.no_grad():
        want = _call(peer)
    peer_skipped = [i for i, n in enumerate(sizes) if n == 1]

    pipe = _pipe()
    session = mixcache_compile.enable(
        pipe, policy="fastercache", engine="eager", num_steps=STEPS, attn_window=None, cfg_interval=5,
        cfg_window=steps_in_timestep_window(ts, *cfg_window), boost="compound", alpha_low=0.1, alpha_high=0.1,
        low_boost_window=steps_in_timestep_window(ts, *low), high_boost_window=steps_in_timestep_window(ts, *high),
    )
    with torch.no_grad():
        got = _call(pipe)
    ours_skipped = [e.step for e in session.trace if e.action == "CFG"]
    assert ours_skipped == peer_skipped == [6, 7, 8, 9, 11, 12, 13, 14, 16, 17, 18, 19]
    assert not session.stats()["fallbacks"]
    err = (got - want).abs().max().item()
    assert err <= PEER_TOL, err
    with torch.no_grad():
        plain = _call(_pipe())
    assert (plain - want).abs().max().item() > 100 * PEER_TOL  # the skips do change the result


def test_fbcache_matches_diffusers_first_block_cache():
    from diffusers import FirstBlockCacheConfig

    threshold = 0.215
    peer = _pipe()
    calls: list[int] = []
    peer.transformer.transformer_blocks[1].attn1.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    steps_seen = []
    peer.transformer.transformer_blocks[0].register_forward_pre_hook(lambda m, a, k: steps_seen.append(len(calls)), with_kwargs=True)
    peer.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    with torch.no_grad():
        want = _call(peer)
    # a step skipped the tail iff block 1's attention did not run between two block-0 calls
    marks = steps_seen + [len(calls)]
    peer_skipped = [i for i in range(STEPS) if marks[i + 1] == marks[i]]

    pipe = _pipe()
    session = mixcache_compile.enable(pipe, policy="fbcache", engine="eager", threshold=threshold)
    with torch.no_grad():
        got = _call(pipe)
    ours_skipped = [e.step for e in session.trace if e.action.startswith("BLOCK")]
    indicators = [round(e.indicator, 4) for e in session.trace]
    assert ours_skipped == peer_skipped, (indicators, ours_skipped, peer_skipped)
    assert 3 <= len(ours_skipped) <= STEPS - 5, indicators
    assert all(abs(i - threshold) > 1e-3 for i in indicators), indicators  # no decision at the float noise level
    assert not session.stats()["fallbacks"]
    err = (got - want).abs().max().item()
    assert err <= PEER_TOL, err
