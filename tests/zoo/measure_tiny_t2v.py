"""Measure the figures quoted in mixcache_compile/zoo/MODEL_CARD.md (not a test; ~1-2 min).

    python tests/zoo/measure_tiny_t2v.py [--model tiny|deep] [--seeds 3] [--samples mixcache_compile/zoo/samples.png]
    [--shift S]   (sampler shift; default: the one in the model's config.json)

Uses one torch thread, like the training run, unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from test_tiny_t2v import PROMPT_SET, every_other_step, generate  # noqa: E402

from mixcache_compile.zoo import default_call_kwargs, load_pipeline  # noqa: E402
from mixcache_compile.zoo.checks import describe, follows_prompt, psnr  # noqa: E402
from mixcache_compile.zoo.data import all_clips  # noqa: E402


def save_samples(videos: torch.Tensor, labels: list[str], path: Path) -> None:
    """Rows of clips, every other frame, upscaled to ~96 px with nearest neighbour."""
    from PIL import Image, ImageDraw

    frames = list(range(0, videos.shape[2], 2))
    scale, pad, label_w = max(1, 96 // videos.shape[3]), 2, 170
    h, w = videos.shape[3] * scale, videos.shape[4] * scale
    img = Image.new("RGB", (label_w + len(frames) * (w + pad), len(videos) * (h + pad)), (40, 40, 40))
    draw = ImageDraw.Draw(img)
    for r, (video, label) in enumerate(zip(videos, labels)):
        draw.text((4, r * (h + pad) + h // 2 - 6), label, fill=(230, 230, 230))
        for c, f in enumerate(frames):
            px = ((video[:, f].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(px).resize((w, h), Image.NEAREST)
            img.paste(tile, (label_w + c * (w + pad), r * (h + pad)))
    img.save(path, optimize=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=Path, default=None)
    p.add_argument("--model", default="tiny")
    p.add_argument("--shift", type=float, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(name=args.model)
    if args.shift is not None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.shift)
    pipe.set_progress_bar_config(disable=True)
    report: dict = {"model": args.model, "shift": pipe.scheduler.config.shift, "threads": args.threads}

    # Time of one 30-step CFG generation (60 transformer calls), after a warm-up call.
    generate(pipe, ["red circle moving left"], [0], num_inference_steps=2)
    times = []
    for s in range(3):
        t0 = time.perf_counter()
        pipe(prompt="red circle moving left", generator=torch.Generator().manual_seed(s), **default_call_kwargs())
        times.append(time.perf_counter() - t0)
    report["seconds_per_30_step_cfg_generation"] = round(statistics.median(times), 2)

    # Prompt following over every prompt x seeds.
    clips = all_clips()
    hits, misses, shape_hits, total = 0, [], 0, 0
    for seed in range(args.seeds):
        videos = generate(pipe, [c.prompt for c in clips], [1000 * seed + i for i in range(len(clips))])
        for clip, video in zip(clips, videos):
            ok = follows_prompt(video, clip)
            hits += ok
            shape_hits += describe(video)[1] == clip.shape
            total += 1
            if not ok:
                misses.append((clip.prompt, seed, describe(video)))
        if seed == 0 and args.samples is not None:
            rows = list(range(0, len(clips), 3))
            save_samples(videos[rows], [clips[i].prompt for i in rows], args.samples)
    report["prompt_following"] = {"hits": hits, "total": total, "accuracy": round(hits / total, 4),
                                  "shape_accuracy": round(shape_hits / total, 4), "misses": misses}

    # The test's prompt set: test-set accuracy, guided vs unguided, every-other-step reuse.
    prompts, seeds = [c.prompt for c, _ in PROMPT_SET], [s for _, s in PROMPT_SET]
    guided = generate(pipe, prompts, seeds)
    unguided = generate(pipe, prompts, seeds, guidance_scale=1.0)
    with every_other_step(pipe.transformer):
        cached = generate(pipe, prompts, seeds)
    report["test_set_accuracy"] = sum(follows_prompt(v, c) for v, (c, _) in zip(guided, PROMPT_SET)) / len(PROMPT_SET)
    g_vs_u = [psnr(a, b) for a, b in zip(guided, unguided)]
    c_vs_u = [psnr(a, b) for a, b in zip(guided, cached)]
    report["psnr_guided_vs_unguided_db"] = {"first": round(g_vs_u[0], 2), "mean": round(statistics.mean(g_vs_u), 2),
                                            "max": round(max(g_vs_u), 2)}
    report["psnr_every_other_step_vs_uncached_db"] = {"first": round(c_vs_u[0], 2),
                                                      "mean": round(statistics.mean(c_vs_u), 2),
                                                      "max": round(max(c_vs_u), 2)}
    report["unguided_accuracy"] = sum(follows_prompt(v, c) for v, (c, _) in zip(unguided, PROMPT_SET)) / len(PROMPT_SET)
    report["every_other_step_accuracy"] = sum(follows_prompt(v, c) for v, (c, _) in zip(cached, PROMPT_SET)) / len(PROMPT_SET)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
