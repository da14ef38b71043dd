"""``mixcache demo``: the shipped model's video, uncached and cached, side by side.

Generates one prompt's video through the real ``WanPipeline`` twice, uncached (policy
``none``) and with a caching policy, on the same engine, seed and scheduler; writes both as
GIF, a frame strip and the decision timeline PNG, and prints speedup (median of interleaved
repetitions), FLOP computed fraction, PSNR and SSIM against the uncached video.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..api import enable
from ..policies import make_policy
from ..progress import is_quiet, progress
from .metrics import psnr, ssim
from .timeline import plot_timeline
from .timing import interleaved_medians
from .video_io import write_gif, write_strip

DEFAULT_POLICY = "mixcache"
FALLBACK_POLICY = ("static", {"every": 2, "warmup": 6})


@dataclass
class DemoResult:
    model: str
    prompt: str
    policy: str
    engine: str
    steps: int
    speedup: float
    computed_fraction: float
    psnr_db: float
    ssim: float
    actions: dict[str, int]
    files: dict[str, str]
    session_summary: str = ""  # CacheSession.summary() of the cached pipeline over the timed generations


def resolve_policy(policy: str | None, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The requested policy, or the default one (falling back if it is not in this build)."""
    if policy:
        return policy, options
    try:
        make_policy(DEFAULT_POLICY)
        return DEFAULT_POLICY, options
    except ValueError:
        return FALLBACK_POLICY[0], {**FALLBACK_POLICY[1], **options}


def run_demo(
    prompt: str = "red circle moving left",
    policy: str | None = None,
    engine: str = "eager",
    steps: int = 30,
    guidance_scale: float = 5.0,
    seed: int = 0,
    repeats: int = 3,
    out: Path = Path("out/demo"),
    policy_options: dict[str, Any] | None = None,
    model: str = "tiny",
) -> DemoResult:
    from ..zoo import default_call_kwargs, load_pipeline

    policy, options = resolve_policy(policy, dict(policy_options or {}))
    uncached_pipe, cached_pipe = load_pipeline(name=model), load_pipeline(name=model)
    uncached = enable(uncached_pipe, "none", engine)
    cached = enable(cached_pipe, policy, engine, **options)
    call = dict(prompt=prompt, **default_call_kwargs(num_inference_steps=steps, guidance_scale=guidance_scale))

    def generate(pipe) -> torch.Tensor:
        return pipe(generator=torch.Generator().manual_seed(seed), **call).frames

    for pipe in (uncached_pipe, cached_pipe):  # the first runs show the pipeline's own bar (Note [quiet progress])
        pipe.set_progress_bar_config(disable=True if is_quiet() else None)
    with torch.no_grad():
        reference = generate(uncached_pipe)
        video = generate(cached_pipe)
        for pipe in (uncached_pipe, cached_pipe):
            pipe.set_progress_bar_config(disable=True)
        cached.reset_stats()
        bar = progress(desc="timing uncached / cached", total=2 * repeats, unit="generation")

        def ticking(pipe: Any) -> Any:
            return lambda: (generate(pipe), bar.update())

        times = interleaved_medians({"uncached": ticking(uncached_pipe), "cached": ticking(cached_pipe)}, repeats=repeats, warmup=0)
        bar.close()
    stats = cached.stats()
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "uncached_gif": str(write_gif(reference, out / "uncached.gif", scale=8)),
        "cached_gif": str(write_gif(video, out / f"{policy}.gif", scale=8)),
        "strip": str(write_strip({"uncached": reference, policy: video}, out / "frames.png", scale=8)),
        "timeline": str(plot_timeline(cached.trace, out / "timeline.png", title=f"{policy} on '{prompt}', {steps} steps")),
    }
    result = DemoResult(
        model=model, prompt=prompt, policy=policy, engine=engine, steps=steps,
        speedup=times["uncached"] / times["cached"], computed_fraction=stats["computed_fraction"],
        psnr_db=psnr(video, reference), ssim=ssim(video, reference), actions=stats["actions"], files=files,
        session_summary=cached.summary(),
    )
    (out / "demo.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def summary(r: DemoResult) -> str:
    return "\n".join([
        f"model {r.model}, prompt '{r.prompt}', {r.steps} steps, CFG on, engine {r.engine}, policy {r.policy}",
        f"  speedup vs uncached (same engine, median):  {r.speedup:.2f}x",
        f"  computed fraction (FLOPs run / FLOPs full): {r.computed_fraction:.3f}",
        f"  PSNR vs uncached: {r.psnr_db:.2f} dB    SSIM: {r.ssim:.4f}",
        f"  actions: {r.actions}",
        *(f"  wrote {path}" for path in r.files.values()),
        "",
        "cached pipeline over the timed generations:",
        r.session_summary,
    ])
