"""Peer adapters on a tiny random-weight WanPipeline: each switches its method on (the output
changes), resets, and switches it off again (the output is the uncached one)."""

from __future__ import annotations

import pytest
import torch

from mixcache_compile.eval import peers
from tests.tiny_models import wan

STEPS = 8


def _pipe(cls=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    model, _ = wan(num_layers=3)
    pipe = (cls or WanPipeline)(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe):
    g = torch.Generator().manual_seed(7)
    embeds, negative = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=64, width=64, num_frames=5,
                    num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames


def test_parse_mag_ratios_reads_the_printed_lists():
    text = "\n[MagCache] Calibration Complete. Copy these values to MagCacheConfig(mag_ratios=...):\n[1.0, 0.98, 1.02e0]\n\nother\n[1.0, 0.5]\n"
    assert peers.parse_mag_ratios(text) == [[1.0, 0.98, 1.02], [1.0, 0.5]]


@pytest.mark.parametrize("peer", [
    peers.FirstBlockCachePeer(threshold=0.5),
    peers.TaylorSeerPeer(cache_interval=2, disable_cache_before_step=2),
    peers.MagCachePeer(threshold=0.5),
    peers.PyramidAttentionBroadcastPeer(2, (0, 1000)),
], ids=lambda p: p.key)
def test_diffusers_peer_enable_reset_disable(peer):
    pipe = _pipe()
    reference = _run(pipe)
    ctx = peers.PeerContext(STEPS, run_once=_run)
    peer.enable(pipe, ctx)
    cached = _run(pipe)
    assert not torch.equal(cached, reference), f"{peer.id} changed nothing"
    peer.reset(pipe)
    torch.testing.assert_close(_run(pipe), cached, rtol=0, atol=0)  # state does not leak between generations
    peer.disable(pipe)
    torch.testing.assert_close(_run(pipe), reference, rtol=0, atol=0)
    if isinstance(peer, peers.MagCachePeer):
        assert ("magcache_ratios", STEPS) in ctx.memo and len(ctx.memo[("magcache_ratios", STEPS)]) == STEPS


def test_fastercache_fails_on_separate_cfg_calls():
    pipe = _pipe()
    peers.FasterCachePeer().enable(pipe, peers.PeerContext(STEPS))
    with pytest.raises(IndexError):
        _run(pipe)


def test_cache_dit_dbcache_on_an_unregistered_wan_pipeline_subclass():
    pytest.importorskip("cache_dit")
    from diffusers import WanPipeline

    class MyWanPipeline(WanPipeline):  # cache-dit matches pipelines by class-name prefix: not registered
        pass

    pipe = _pipe(MyWanPipeline)
    reference = _run(pipe)
    peer = peers.CacheDitDBCachePeer(residual_diff_threshold=0.5, max_warmup_steps=2)
    ctx = peers.PeerContext(STEPS)
    peer.enable(pipe, ctx)
    assert any("BlockAdapter" in n for n in ctx.notes)
    cached = _run(pipe)
    assert not torch.equal(cached, reference)
    peer.disable(pipe)
    torch.testing.assert_close(_run(pipe), reference, rtol=0, atol=0)
