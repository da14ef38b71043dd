"""Worker of tests/runtime/test_context_parallel.py: a short denoising loop of a tiny Wan under
mixcache, alone or on one rank of diffusers' context parallelism (two gloo processes)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist

import mixcache_compile
from mixcache_compile.parallel import prepare_context_parallel
from tests.runtime import dist_worker
from tests.tiny_models import wan

STEPS = 6
# Each policy reaches a reuse path: static reuses a range starting at block 0 (the first block
# is where diffusers shards the sequence), attention and whole steps; teacache probes the
# (replicated) prologue, fbcache the (sharded) first-block residual.
POLICIES: dict[str, dict[str, Any]] = {
    "static": {"policy": "static", "schedule": {1: "block:0-2", 2: "attn:0,1,2", 3: "step", 4: "block:1-3"}},
    "teacache": {"policy": "teacache", "threshold": 0.3},
    "fbcache": {"policy": "fbcache", "threshold": 0.3},
}


def denoise(model: torch.nn.Module, name: str, direct_backend: bool = False) -> dict[str, Any]:
    """A 6-step Euler-like loop; returns the final latent, every call's output and the trace."""
    torch._dynamo.reset()
    options = dict(POLICIES[name])
    if direct_backend:  # torch.compile(backend="mixcache") instead of enable()
        session = mixcache_compile.CacheSession(options.pop("policy"), **options)
        compiled = torch.compile(model, backend="mixcache", options={"session": session, "engine": "eager"}, fullgraph=True)
        prepare_context_parallel(compiled, session)
    else:
        session = mixcache_compile.enable(model, engine="eager", **options)
        compiled = session.compiled
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    text = torch.randn(1, 5, 16, generator=g)
    outputs = []
    with torch.no_grad():
        for step in range(STEPS):
            t = torch.tensor([900.0 - 150 * step])
            with session.context("cond", step_index=step, num_inference_steps=STEPS):
                out = compiled(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            outputs.append(out.tolist())
            x = x - 0.1 * out
    trace = [{"step": e.step, "action": e.action, "fallback": e.fallback, "indicator": e.indicator} for e in session.trace]
    return {"outputs": outputs, "trace": trace, "calls": session.stats()["calls"]}


def _attention_with_lse(
    ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
    return_lse: bool = False, _save_ctx: bool = True, _parallel_config: Any = None,
) -> Any:
    """Test-only stand-in for diffusers' native context-parallel attention op that also returns
    the log-sum-exp ring attention merges its partial results with. No attention backend that
    diffusers ships returns it on CPU (native refuses ``return_lse``; cuDNN / flash need CUDA),
    so without this ring attention cannot run here. Layout as diffusers': (B, S, H, D) in,
    out (B, S, H, D) and lse (B, S, H)."""
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise NotImplementedError("the test attention op covers unmasked, non-causal attention only")
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    out = (torch.softmax(scores, dim=-1) @ v).permute(0, 2, 1, 3)
    return (out, torch.logsumexp(scores, dim=-1).permute(0, 2, 1)) if return_lse else out


def main(rank: int, world: int, port: int, out_dir: str, cases: list[tuple[str, str, bool]]) -> None:
    """``cases``: (policy name, "ulysses" | "ring", direct_backend). The same pair of processes
    also runs ``dist_worker``'s sharded loop, alone and then in the group (starting a pair of
    processes costs more than either)."""
    from diffusers import ContextParallelConfig

    torch.set_num_threads(1)
    results: dict[str, Any] = {"shard/local": dist_worker.run_loop(rank)}  # before the group exists
    # diffusers picks the device as rank % torch.accelerator.device_count(), which is 0 on a
    # machine without an accelerator; one CPU "device" per process is what gloo runs on.
    torch.accelerator.device_count = lambda: 1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results["shard/reduced"] = dist_worker.run_loop(rank)
        for name, mode, direct in cases:
            if mode == "ring":
                from diffusers.models import attention_dispatch

                attention_dispatch._native_attention_forward_op = _attention_with_lse
            model, _ = wan()
            model.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": world}))
            results[f"{name}/{mode}/{'backend' if direct else 'enable'}"] = denoise(model, name, direct)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
