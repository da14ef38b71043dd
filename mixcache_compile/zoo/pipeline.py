"""Assemble a ready diffusers WanPipeline around the shipped tiny pixel-space model.

The pipeline runs without a VAE: with output_type="latent" its "latents" are the pixel video.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file

from .spec import HEIGHT, NUM_FRAMES, TEXT_LEN, WIDTH
from .text import TinyTextEncoder, WordTokenizer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "tiny_t2v.safetensors"
CONFIG_FILE = WEIGHTS_DIR / "config.json"

# The shipped models by name: each directory holds config.json and tiny_t2v.safetensors.
# "tiny": 4 blocks, 64 tokens per clip (the first model); "deep": 8 blocks, 128 tokens, grown
# from "tiny" and trained further (tools/train_tiny_t2v.py --preset deep). Same data family,
# same text encoder vocabulary, same clip size.
MODELS: dict[str, Path] = {"tiny": WEIGHTS_DIR, "deep": WEIGHTS_DIR / "deep"}
DEFAULT_MODEL = "tiny"


def weights_dir_for(name: str = DEFAULT_MODEL) -> Path:
    """The weights directory of a shipped model; a clear error for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown shipped model {name!r}; shipped models: {', '.join(MODELS)}")
    return MODELS[name]

_ROUNDING_WARNING = "`num_frames - 1` has to be divisible by"


class _DropFrameRoundingWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _ROUNDING_WARNING not in record.getMessage()


class TinyWanPipeline(WanPipeline):
    """WanPipeline whose height/width/num_frames are pixel sizes, defaulting to the native clip.

    WanPipeline assumes a causal VAE (frames = 1 + 4k) and, with the temporal scale factor set
    to 1, its check `num_frames % 1 != 1` is always true and adds a frame. This subclass hands
    it one frame fewer (and drops that now-meaningless warning) so the output has exactly
    `num_frames` frames. Defaults are the native clip, output_type="latent" (pixels, as there
    is no VAE) and the training text length; the output is clamped to [-1, 1]. Everything
    else is the stock WanPipeline.__call__.
    """

    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = HEIGHT,
        width: int = WIDTH,
        num_frames: int = NUM_FRAMES,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        output_type: str = "latent",
        max_sequence_length: int = TEXT_LEN,
        **kwargs: Any,
    ) -> Any:
        if output_type != "latent":
            raise ValueError("the tiny model has no VAE: use output_type='latent' (it returns pixels)")
        patch_t = self.transformer.config.patch_size[0]
        if num_frames % patch_t:
            raise ValueError(f"num_frames must be a multiple of the temporal patch size {patch_t}, got {num_frames}")
        # With a temporal factor of 1 the stock rounding turns F into F + 1 frames: ask for F - 1.
        frames_arg = num_frames - 1 if self.vae_scale_factor_temporal == 1 else num_frames
        wan_logger = logging.getLogger("diffusers.pipelines.wan.pipeline_wan")
        quiet = _DropFrameRoundingWarning()
        wan_logger.addFilter(quiet)
        try:
            out = super().__call__(
                prompt=prompt,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                num_frames=frames_arg,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                output_type=output_type,
                max_sequence_length=max_sequence_length,
                **kwargs,
            )
        finally:
            wan_logger.removeFilter(quiet)
        # The Euler end point can overshoot the data range slightly; pixels live in [-1, 1].
        if isinstance(out, tuple):
            return (out[0].clamp(-1.0, 1.0), *out[1:])
        out.frames = out.frames.clamp(-1.0, 1.0)
        return out


@lru_cache(maxsize=4)
def load_config(weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """The shipped config.json: transformer/encoder configs, video size, training facts."""
    return json.loads((Path(weights_dir) / CONFIG_FILE.name).read_text())


def _split_state(prefix: str, weights_dir: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(Path(weights_dir) / WEIGHTS_FILE.name))
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_transformer(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights_dir: Path = WEIGHTS_DIR
) -> WanTransformer3DModel:
    """The trained diffusers.WanTransformer3DModel, in eval mode."""
    model = WanTransformer3DModel(**load_config(weights_dir)["transformer"])
    model.load_state_dict(_split_state("transformer.", weights_dir), strict=True)
    model.to(device=device)
    if dtype != torch.float32:
        _cast_keeping_fp32(model, dtype)
    return model.eval()


def _cast_keeping_fp32(model: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast like from_pretrained(torch_dtype=...): Wan's norms/time embedder stay in float32
    (ModelMixin.to(dtype) would cast them too, and warn about it)."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not any(k in name.split(".") for k in keep):
            tensor.data = tensor.data.to(dtype)


def load_text_encoder(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights_dir: Path = WEIGHTS_DIR
) -> TinyTextEncoder:
    encoder = TinyTextEncoder(**load_config(weights_dir)["text_encoder"])
    encoder.load_state_dict(_split_state("text_encoder.", weights_dir), strict=True)
    return encoder.to(device=device, dtype=dtype).eval()


def load_scheduler(weights_dir: Path = WEIGHTS_DIR) -> FlowMatchEulerDiscreteScheduler:
    cfg = load_config(weights_dir)["scheduler"]
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg["num_train_timesteps"], shift=cfg["shift"])


def load_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: Path | None = None,
    *,
    name: str = DEFAULT_MODEL,
) -> TinyWanPipeline:
    """A ready WanPipeline (vae=None) producing (B, 3, F, H, W) pixel videos with output_type="latent".

    The frames are the Euler end point clamped to [-1, 1] (the clamp only trims rare overshoot).
    `name` picks a shipped model (`MODELS`: "tiny", the default, or "deep"); `weights_dir`, if
    given, loads another checkpoint directory instead (for evaluating training runs).
    """
    weights_dir = Path(weights_dir) if weights_dir is not None else weights_dir_for(name)
    pipe = TinyWanPipeline(
        tokenizer=WordTokenizer(tuple(load_config(weights_dir)["vocab"])),
        text_encoder=load_text_encoder(device, dtype, weights_dir),
        vae=None,
        scheduler=load_scheduler(weights_dir),
        transformer=load_transformer(device, dtype, weights_dir),
    )
    # No VAE: pipeline sizes are pixel sizes (latent = pixel, so both scale factors are 1).
    pipe.vae_scale_factor_temporal = 1
    pipe.vae_scale_factor_spatial = 1
    return pipe


def default_call_kwargs(num_inference_steps: int = 30, guidance_scale: float = 5.0) -> dict[str, Any]:
    """Keyword arguments for pipe(...) at the model's native size (also the pipeline defaults)."""
    video = load_config()["video"]
    return {
        "negative_prompt": "",
        "height": video["height"],
        "width": video["width"],
        "num_frames": video["num_frames"],
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "output_type": "latent",
        "max_sequence_length": load_config()["text_len"],
    }
