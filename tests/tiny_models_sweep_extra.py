"""Tiny configs of the sweep's remaining classes, written from the installed diffusers source
(``tests/passes/test_model_sweep.py``), and ``NOT_SWEPT``: the classes that cannot be built
small on CPU, with the concrete reason."""

from __future__ import annotations

from typing import Any

import torch

from tests.tiny_models_sweep_base import SweepSpec, r, t


def _stable_audio(seed: int) -> dict[str, Any]:
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    length = 8  # latent frames; the global token is prepended, as the pipeline's rotary table expects
    rope = get_1d_rotary_pos_embed(4, length + 1, use_real=True, repeat_interleave_real=False)
    return {"hidden_states": r(seed, 1, 4, length), "timestep": t(seed), "encoder_hidden_states": r(seed + 50, 1, 6, 16),
            "global_hidden_states": r(seed + 1, 1, 1, 16), "rotary_embedding": rope, "return_dict": False}


def _kandinsky5(seed: int) -> dict[str, Any]:
    frames, size, text = 1, 4, 6
    return {"hidden_states": r(seed, 1, frames, size, size, 4), "encoder_hidden_states": r(seed + 50, 1, text, 16),
            "timestep": t(seed), "pooled_projections": r(seed + 1, 1, 8),
            "visual_rope_pos": [torch.arange(frames), torch.arange(size // 2), torch.arange(size // 2)],
            "text_rope_pos": torch.arange(text), "return_dict": False}


def _qwenimage21(seed: int) -> dict[str, Any]:
    text, side = 4, 2
    img_mask = torch.zeros(1, text + side * side // 4, dtype=torch.bool)
    img_mask[:, text:] = True  # one vision slot per 2x2 group of target latents, after the text
    return {"hidden_states": r(seed, 1, side * side, 4), "encoder_hidden_states": r(seed + 50, 1, text, 8),
            "encoder_hidden_states_mask": torch.ones(1, text, dtype=torch.long), "timestep": t(seed) / 1000,
            "img_shapes": [[(1, side, side)]], "img_mask": img_mask, "return_dict": False}


def _sana_wm_refiner(seed: int, model: torch.nn.Module) -> dict[str, Any]:
    frames, size = 2, 2
    rope = model.build_rotary_emb_for_absolute_positions(batch_size=1, frame_positions=list(range(frames)), height=size,
                                                        width=size, device=torch.device("cpu"), fps=24.0)
    tokens = frames * size * size
    return {"hidden_states": r(seed, 1, tokens, 4), "encoder_hidden_states": r(seed + 50, 1, 6, 16),
            "timestep": torch.full((1, tokens), 900.0 - 100 * seed), "video_rotary_emb": rope,
            "encoder_attention_mask": torch.ones(1, 6), "return_dict": False}


SPECS: dict[str, SweepSpec] = {
    "Transformer2DModel": SweepSpec(
        {"num_attention_heads": 2, "attention_head_dim": 4, "in_channels": 8, "num_layers": 2, "norm_num_groups": 2,
         "cross_attention_dim": 8},
        lambda s: {"hidden_states": r(s, 1, 8, 4, 4), "encoder_hidden_states": r(s + 50, 1, 6, 8), "timestep": t(s).long(),
                   "return_dict": False}),
    "DreamLiteTransformer2DModel": SweepSpec(
        {"num_attention_heads": 2, "attention_head_dim": 4, "in_channels": 8, "num_layers": 2, "norm_num_groups": 2,
         "cross_attention_dim": 8},
        lambda s: {"hidden_states": r(s, 1, 8, 4, 4), "encoder_hidden_states": r(s + 50, 1, 6, 8), "timestep": t(s).long(),
                   "return_dict": False}),
    "StableAudioDiTModel": SweepSpec(
        {"sample_size": 8, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
         "num_key_value_attention_heads": 1, "out_channels": 4, "cross_attention_dim": 16, "time_proj_dim": 16,
         "global_states_input_dim": 16, "cross_attention_input_dim": 16},
        _stable_audio),
    "Flux3Transformer2DModel": SweepSpec(
        {"in_channels": 4, "cond_in_channels": 4, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "timestep_channels": 32, "axes_dims_rope": (4, 4, 4, 4)},
        lambda s: {"hidden_states": r(s, 1, 16, 4), "encoder_hidden_states": r(s + 50, 1, 8, 32), "timestep": t(s) / 1000,
                   "img_ids": torch.zeros(16, 4), "txt_ids": torch.zeros(8, 4), "return_dict": False}),
    "BriaFibo2Transformer2DModel": SweepSpec(
        {"in_channels": 4, "patch_size": 2, "dim": 32, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "cap_feat_dim": 16,
         "injection_layer_ids": (1,), "perceiver_num_layers": 1, "min_num_gist_tokens": 4, "max_num_gist_tokens": 8,
         "gist_step": 4, "gist_min_text_len": 4, "gist_max_text_len": 16, "axes_dims": (4, 6, 6), "axes_lens": (64, 16, 16)},
        lambda s: {"hidden_states": r(s, 1, 4, 8, 8), "timestep": t(s) / 1000, "encoder_hidden_states": r(s + 50, 1, 2, 6, 16),
                   "return_dict": False}),
    "HunyuanImageTransformer2DModel": SweepSpec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
         "num_single_layers": 1, "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": (1, 1), "text_embed_dim": 16,
         "rope_axes_dim": (4, 4)},
        lambda s: {"hidden_states": r(s, 1, 4, 4, 4), "timestep": t(s), "encoder_hidden_states": r(s + 50, 1, 6, 16),
                   "encoder_attention_mask": torch.ones(1, 6), "return_dict": False}),
    "Kandinsky5Transformer3DModel": SweepSpec(
        {"in_visual_dim": 4, "in_text_dim": 16, "in_text_dim2": 8, "time_dim": 16, "out_visual_dim": 4, "patch_size": (1, 2, 2),
         "model_dim": 32, "ff_dim": 64, "num_text_blocks": 1, "num_visual_blocks": 2, "axes_dims": (4, 6, 6)},
        _kandinsky5),
    "Kandinsky6Transformer3DModel": SweepSpec(
        {"in_visual_dim": 4, "out_visual_dim": 4, "in_text_dim": 8, "in_text_dim2": 8, "time_dim": 16, "patch_size": (1, 2, 2),
         "model_dim": 48, "ff_dim": 64, "num_text_blocks": 1, "num_visual_blocks": 2, "axes_dims": (4, 4, 4), "visual_cond": True,
         "in_audio_dim": 4, "out_audio_dim": 4},
        lambda s: {"hidden_states": r(s, 1, 2, 4, 4, 9), "encoder_hidden_states": r(s + 50, 1, 6, 8),
                   "pooled_projections": r(s + 1, 1, 8), "timestep": t(s), "return_dict": False}),
    "Kandinsky6SRTransformer3DModel": SweepSpec(
        {"in_visual_dim": 4, "out_visual_dim": 4, "time_dim": 16, "model_dim": 32, "ff_dim": 64, "num_visual_blocks": 2,
         "axes_dims": (4, 6, 6), "nabla_window": (3, 3, 3), "tile_sizes": ((64, 64),)},
        lambda s: {"hidden_states": r(s, 1, 1, 8, 8, 9), "timestep": t(s), "return_dict": False},
        # torch.utils.flop_counter has no rule for the flex_attention higher-order op (fake or real).
        flops_unknown="'NotImplementedType' object is not subscriptable"),
    "QwenImage21Transformer2DModel": SweepSpec(
        {"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
         "context_in_dim": 8, "mlp_ratio": 2, "axes_dims_rope": (4, 6, 6)},
        _qwenimage21),
    "SanaWMLTX2RefinerTransformer3DModel": SweepSpec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "cross_attention_dim": 16,
         "audio_in_channels": 4, "audio_out_channels": 4, "audio_num_attention_heads": 2, "audio_attention_head_dim": 4,
         "audio_cross_attention_dim": 8, "num_layers": 2, "caption_channels": 16, "rope_double_precision": False},
        _sana_wm_refiner, with_model=True),
    "SanaWMTransformer3DModel": SweepSpec(
        {"in_channels": 4, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "linear_head_dim": 16,
         "softmax_every_n": 2, "chunk_plucker_channels": 8, "chunk_plucker_post_attn_blocks": 2, "caption_channels": 16,
         "image_size": 8, "mixed_precision": "fp32"},
        # No camera conditions: the plain text-to-video path. The timestep is per latent frame, (B, 1, T).
        lambda s: {"hidden_states": r(s, 1, 4, 2, 4, 4), "timestep": t(s).expand(1, 1, 2).clone(),
                   "encoder_hidden_states": r(s + 50, 1, 6, 16), "encoder_attention_mask": torch.ones(1, 6), "return_dict": False}),
}

NOT_SWEPT: dict[str, str] = {}
