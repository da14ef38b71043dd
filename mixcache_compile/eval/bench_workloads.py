"""``mixcache bench`` workloads: the shipped model for fidelity, a larger random-weight model
of the same class for speed. Each gives every method a fresh copy of its pipeline."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch

from .bench_config import PROMPTS, BenchConfig


class Workload:
    """A base pipeline, the samples to generate and how; ``fresh_pipe`` gives each method its own copy."""

    name = ""

    def __init__(self, base: Any, samples: list[tuple[str, int]], steps: int) -> None:
        self.base = base
        self.samples = samples
        self.steps = steps
        base.set_progress_bar_config(disable=True)

    @property
    def num_layers(self) -> int:
        return len(self.base.transformer.blocks)

    def fresh_pipe(self) -> Any:
        return copy.deepcopy(self.base)

    def generate(self, pipe: Any, sample: tuple[str, int]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class ShippedWorkload(Workload):
    name = "shipped"

    def __init__(self, steps: int, prompts: int, seeds: int, guidance_scale: float) -> None:
        from ..zoo import load_pipeline

        self.guidance_scale = guidance_scale
        super().__init__(load_pipeline(), [(p, s) for p in PROMPTS[:prompts] for s in range(seeds)], steps)

    def generate(self, pipe: Any, sample: tuple[str, int]) -> torch.Tensor:
        from ..zoo import default_call_kwargs

        prompt, seed = sample
        kwargs = default_call_kwargs(num_inference_steps=self.steps, guidance_scale=self.guidance_scale)
        with torch.no_grad():
            return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **kwargs).frames

    def describe(self) -> dict[str, Any]:
        from ..zoo.pipeline import WEIGHTS_FILE, load_config

        cfg = load_config()
        return {
            "model": "shipped tiny WanTransformer3DModel (mixcache_compile.zoo)",
            "transformer": cfg["transformer"],
            "video": cfg["video"],
            "training": cfg.get("training"),
            "weights_sha256": file_sha256(WEIGHTS_FILE),
            "tokens": (cfg["video"]["num_frames"] // cfg["transformer"]["patch_size"][0])
            * (cfg["video"]["height"] // cfg["transformer"]["patch_size"][1])
            * (cfg["video"]["width"] // cfg["transformer"]["patch_size"][2]),
            "samples": [{"prompt": p, "seed": s} for p, s in self.samples],
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": cfg["scheduler"],
        }


class SpeedWorkload(Workload):
    """Random-weight WanTransformer3DModel in a stock WanPipeline, fed prompt embeddings."""

    name = "speed"
    TEXT_LEN, TEXT_DIM = 16, 64

    def __init__(self, cfg: BenchConfig) -> None:
        from diffusers import WanPipeline, WanTransformer3DModel

        from ..zoo.pipeline import load_scheduler

        self.cfg = cfg
        self.model_config = dict(
            patch_size=(1, 2, 2), num_attention_heads=cfg.bench_heads, attention_head_dim=cfg.bench_head_dim,
            in_channels=16, out_channels=16, text_dim=self.TEXT_DIM, freq_dim=64,
            ffn_dim=4 * cfg.bench_heads * cfg.bench_head_dim, num_layers=cfg.bench_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
        )
        torch.manual_seed(0)
        model = WanTransformer3DModel(**self.model_config).eval()
        base = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=load_scheduler())
        g = torch.Generator().manual_seed(1234)
        self.prompt_embeds = torch.randn(1, self.TEXT_LEN, self.TEXT_DIM, generator=g)
        self.negative_embeds = torch.randn(1, self.TEXT_LEN, self.TEXT_DIM, generator=g)
        super().__init__(base, [("random prompt embedding", 0)], cfg.steps)
        # Pixel sizes WanPipeline turns into the wanted latent size (VAE factors 4 temporal, 8 spatial).
        self.call = dict(
            height=8 * cfg.bench_size, width=8 * cfg.bench_size, num_frames=4 * (cfg.bench_frames - 1) + 1,
            num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, output_type="latent",
        )

    def generate(self, pipe: Any, sample: tuple[str, int]) -> torch.Tensor:
        with torch.no_grad():
            return pipe(prompt_embeds=self.prompt_embeds, negative_prompt_embeds=self.negative_embeds,
                        generator=torch.Generator().manual_seed(sample[1]), **self.call).frames

    def describe(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.base.transformer.parameters())
        return {
            "model": "random-weight WanTransformer3DModel in diffusers.WanPipeline (vae=None, prompt embeddings, latent output)",
            "transformer": {**self.model_config, "patch_size": list(self.model_config["patch_size"])},
            "parameters": params,
            "latent": [16, self.cfg.bench_frames, self.cfg.bench_size, self.cfg.bench_size],
            "tokens": self.cfg.bench_tokens,
            "text_tokens": self.TEXT_LEN,
            "steps": self.steps,
            "guidance_scale": self.cfg.guidance_scale,
            "scheduler": "the shipped model's FlowMatchEulerDiscreteScheduler (shift 2.0)",
        }


def file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
