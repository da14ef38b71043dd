"""Tiny random-weight configs of real diffusers DiTs, with matching call inputs.

Each builder returns ``(model, make_inputs)``; ``make_inputs(batch, seed)`` gives the keyword
arguments of one call. Sizes are minimal so that eager runs take milliseconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Inputs = Callable[..., dict[str, Any]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wan(num_layers: int = 3) -> tuple[torch.nn.Module, Inputs]:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()

    def inputs(batch: int = 1, seed: int = 0, t: float = 500.0) -> dict[str, Any]:
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
            "timestep": torch.full((batch,), t),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "return_dict": False,
        }

    return model, inputs


def cogvideox() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=3, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6, use_rotary_positional_embeddings=True,
    ).eval()

    def inputs(batch: int = 1, seed: int = 0, t: float = 500.0) -> dict[str, Any]:
        g = _gen(seed)
        h, w = 8, 8
        return {
            "hidden_states": torch.randn(batch, 2, 4, h, w, generator=g),
            "encoder_hidden_states": torch.randn(batch, 6, 16, generator=g),
            "timestep": torch.full((batch,), int(t), dtype=torch.long),
            "image_rotary_emb": _cog_rope(h, w, 2, 16),
            "return_dict": False,
        }

    return model, inputs


def _cog_rope(h: int, w: int, frames: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    return get_3d_rotary_pos_embed(head_dim, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), frames)


def hunyuan_video() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    ).eval()

    def inputs(batch: int = 1, seed: int = 0, t: float = 500.0) -> dict[str, Any]:
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, 1, 8, 8, generator=g),
            "timestep": torch.full((batch,), int(t), dtype=torch.long),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "encoder_attention_mask": torch.ones(batch, 5),
            "guidance": torch.full((batch,), 3.0),
            "return_dict": False,
        }

    return model, inputs


def flux() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()

    def inputs(batch: int = 1, seed: int = 0, t: float = 500.0) -> dict[str, Any]:
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 16, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
            "pooled_projections": torch.randn(batch, 32, generator=g),
            "timestep": torch.full((batch,), t / 1000.0),
            "img_ids": torch.zeros(16, 3),
            "txt_ids": torch.zeros(6, 3),
            "return_dict": False,
        }

    return model, inputs


def pixart() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=16, in_channels=4, cross_attention_dim=16, out_channels=8,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()

    def inputs(batch: int = 1, seed: int = 0, t: float = 500.0) -> dict[str, Any]:
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "timestep": torch.full((batch,), int(t), dtype=torch.long),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            "return_dict": False,
        }

    return model, inputs


def sd3() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
    ).eval()

    def inputs(batch: int = 1, seed: int = 0, t: float = 500.0) -> dict[str, Any]:
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "timestep": torch.full((batch,), int(t), dtype=torch.long),
            "return_dict": False,
        }

    return model, inputs


def ltx_video() -> tuple[torch.nn.Module, Inputs]:
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=3, caption_channels=16,
    ).eval()

    def inputs(batch: int = 1, seed: int = 0, t: float = 500.0) -> dict[str, Any]:
        g = _gen(seed)
        return {
            "hidden_states": torch.randn(batch, 2 * 4 * 4, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "timestep": torch.full((batch,), int(t), dtype=torch.long),
            "encoder_attention_mask": torch.ones(batch, 5),
            "num_frames": 2, "height": 4, "width": 4,
            "return_dict": False,
        }

    return model, inputs


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, Inputs]]] = {
    "wan": wan, "cogvideox": cogvideox, "hunyuan_video": hunyuan_video, "flux": flux,
    "pixart": pixart, "sd3": sd3, "ltx_video": ltx_video,
}
