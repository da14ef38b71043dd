"""Tiny random-weight configs of the video transformer classes added to the model sweep
(``tests/passes/test_model_sweep.py``). Each entry: constructor kwargs, and a function of a
seed giving one batch-1 call's keyword arguments. Dims are minimal, 1-2 blocks per chain."""

from __future__ import annotations

from typing import Any

import torch

from tests.tiny_models_sweep_base import SweepSpec, r, t

_WAN_LIKE = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
             "text_dim": 16, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True, "rope_max_seq_len": 32}


def _video(seed: int, channels: int, frames: int, size: int, text: int, dim: int) -> dict[str, Any]:
    return {"hidden_states": r(seed, 1, channels, frames, size, size), "encoder_hidden_states": r(seed + 50, 1, text, dim),
            "timestep": t(seed), "return_dict": False}


def _anyflow(seed: int, frames: int) -> dict[str, Any]:
    # AnyFlow takes (batch, frames, channels, h, w) and a per-frame timestep pair (t, r).
    return {"hidden_states": r(seed, 1, frames, 4, 8, 8), "timestep": t(seed).expand(1, frames).clone(),
            "r_timestep": (t(seed) / 2).expand(1, frames).clone(), "encoder_hidden_states": r(seed + 50, 1, 6, 16),
            "return_dict": False}


def _helios(seed: int) -> dict[str, Any]:
    return {**_video(seed, 4, 2, 8, 6, 16), "timestep": t(seed).long(),
            "indices_hidden_states": torch.tensor([[3.0, 4.0]]), "indices_latents_history_short": torch.tensor([[2.0]]),
            "indices_latents_history_mid": torch.tensor([[1.0]]), "indices_latents_history_long": torch.tensor([[0.0] * 4]),
            "latents_history_short": r(seed + 1, 1, 4, 1, 8, 8), "latents_history_mid": r(seed + 2, 1, 4, 1, 8, 8),
            "latents_history_long": r(seed + 3, 1, 4, 4, 8, 8)}


def _framepack(seed: int) -> dict[str, Any]:
    return {**_video(seed, 4, 3, 4, 6, 16), "timestep": t(seed).long(), "pooled_projections": r(seed + 1, 1, 8),
            "encoder_attention_mask": torch.ones(1, 6), "guidance": torch.tensor([3]), "image_embeds": r(seed + 2, 1, 6, 16),
            "indices_latents": torch.arange(3.0), "latents_clean": r(seed + 3, 1, 4, 2, 4, 4),
            "indices_latents_clean": torch.arange(2.0), "latents_history_2x": r(seed + 4, 1, 4, 2, 4, 4),
            "indices_latents_history_2x": torch.arange(2.0), "latents_history_4x": r(seed + 5, 1, 4, 8, 4, 4),
            "indices_latents_history_4x": torch.arange(8.0)}


def _ltx2(seed: int) -> dict[str, Any]:
    frames, size, audio = 2, 4, 5
    return {"hidden_states": r(seed, 1, frames * size * size, 4), "audio_hidden_states": r(seed + 1, 1, audio, 4),
            "encoder_hidden_states": r(seed + 50, 1, 6, 16), "audio_encoder_hidden_states": r(seed + 51, 1, 6, 16),
            "timestep": t(seed) / 1000, "encoder_attention_mask": torch.ones(1, 6, dtype=torch.bool), "num_frames": frames,
            "height": size, "width": size, "audio_num_frames": audio, "fps": 25.0, "return_dict": False}


def _minimax_h3(seed: int) -> dict[str, Any]:
    text, audio, video = 4, 6, 8
    length = text + audio + video
    text_i, audio_i = torch.arange(text), torch.arange(text, text + audio)
    video_i = torch.arange(text + audio, length)
    tags = torch.zeros(length, dtype=torch.long)
    tags[text_i], tags[audio_i] = 1, 2  # 0 video, 1 text, 2 audio
    step_index = torch.zeros(length, dtype=torch.long)
    step_index[audio_i] = 1  # the audio rows have their own timestep
    pos = torch.zeros(length, 3)
    pos[:, 0] = torch.arange(float(length))
    pos[video_i, 1] = torch.arange(float(video)) % 4
    pos[video_i, 2] = torch.arange(float(video)) % 2
    return {"hidden_states": r(seed, 1, video, 16), "audio_hidden_states": r(seed + 1, 1, audio, 6),
            "encoder_hidden_states": r(seed + 50, 1, text, 8), "timestep": torch.tensor([0.7, 0.3]) - 0.1 * seed,
            "timestep_indices": step_index, "token_tags": tags, "position_ids": pos, "video_indices": video_i,
            "audio_indices": audio_i, "text_indices": text_i, "return_dict": False}


def _wan_animate(seed: int) -> dict[str, Any]:
    frames = 3  # one reference latent frame, then frames - 1 posed ones; the face video has 4 (frames - 1) - 3
    return {"hidden_states": r(seed, 1, 12, frames, 8, 8), "timestep": t(seed).long(),
            "encoder_hidden_states": r(seed + 50, 1, 6, 16), "encoder_hidden_states_image": r(seed + 51, 1, 4, 16),
            "pose_hidden_states": r(seed + 1, 1, 4, frames - 1, 8, 8),
            "face_pixel_values": r(seed + 2, 1, 3, 4 * (frames - 1) - 3, 16, 16), "return_dict": False}


def _wan_animate2(seed: int) -> dict[str, Any]:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    # The reference pass (kv_cache_mode "extract"), which needs no populated cache.
    frames, size = 2, 4
    return {"hidden_states": [r(seed, 16, frames, size, size)], "timestep": t(seed) / 1000,
            "encoder_hidden_states": [r(seed + 50, 6, 32)], "condition_latents": [r(seed + 1, 20, frames, size, size)],
            "encoder_hidden_states_image": r(seed + 2, 1, 4, 1280), "kv_cache": WanAnimate2KVCache(2),
            "kv_cache_mode": "extract", "seq_len": frames * (size // 2) ** 2,
            "offset_grid_sizes": torch.tensor([[frames, size // 2, size // 2]]), "return_dict": False}


SPECS: dict[str, SweepSpec] = {
    "AnyFlowTransformer3DModel": SweepSpec({**_WAN_LIKE, "gate_value": 0.25, "deltatime_type": "r"}, lambda s: _anyflow(s, 2)),
    "AnyFlowFARTransformer3DModel": SweepSpec(
        {**_WAN_LIKE, "compressed_patch_size": (1, 4, 4), "full_chunk_limit": 3, "gate_value": 0.25, "deltatime_type": "r"},
        lambda s: {**_anyflow(s, 4), "chunk_partition": [2, 2]},
        # torch.utils.flop_counter has no rule for the flex_attention higher-order op (fake or real).
        flops_unknown="'NotImplementedType' object is not subscriptable"),
    "ConsisIDTransformer3DModel": SweepSpec(
        {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "time_embed_dim": 2,
         "text_embed_dim": 8, "num_layers": 2, "sample_width": 8, "sample_height": 8, "sample_frames": 8, "patch_size": 2,
         "temporal_compression_ratio": 4, "max_text_seq_length": 8, "cross_attn_interval": 1, "is_kps": False,
         "is_train_face": True, "cross_attn_dim_head": 1, "cross_attn_num_heads": 1, "LFE_id_dim": 2, "LFE_vit_dim": 2,
         "LFE_depth": 5, "LFE_dim_head": 8, "LFE_num_heads": 2, "LFE_num_id_token": 1, "LFE_num_querie": 1,
         "LFE_output_dim": 10, "LFE_ff_mult": 1, "LFE_num_scale": 1},
        lambda s: {"hidden_states": r(s, 1, 1, 4, 8, 8), "encoder_hidden_states": r(s + 50, 1, 8, 8), "timestep": t(s).long(),
                   "id_vit_hidden": [torch.ones(1, 2, 2)], "id_cond": torch.ones(1, 2), "return_dict": False}),
    "HeliosTransformer3DModel": SweepSpec(
        {**{k: v for k, v in _WAN_LIKE.items() if k != "rope_max_seq_len"}, "qk_norm": "rms_norm_across_heads", "rope_dim": (4, 4, 4), "has_multi_term_memory_patch": True,
         "guidance_cross_attn": True, "zero_history_timestep": True, "is_amplify_history": False},
        _helios),
    "HunyuanVideo15Transformer3DModel": SweepSpec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
         "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1, "text_embed_dim": 16,
         "text_embed_2_dim": 8, "image_embed_dim": 12, "rope_axes_dim": (2, 2, 4), "target_size": 16, "task_type": "t2v"},
        lambda s: {**_video(s, 4, 1, 4, 6, 16), "timestep": t(s), "encoder_hidden_states_2": r(s + 1, 1, 4, 8),
                   "encoder_attention_mask": torch.ones(1, 6), "encoder_attention_mask_2": torch.ones(1, 4),
                   "image_embeds": r(s + 2, 1, 3, 12)}),
    "HunyuanVideoFramepackTransformer3DModel": SweepSpec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 10, "num_layers": 2,
         "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 2, "patch_size_t": 1, "guidance_embeds": True,
         "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": (2, 4, 4), "image_condition_type": None,
         "has_image_proj": True, "image_proj_dim": 16, "has_clean_x_embedder": True},
        _framepack),
    "JoyImageEditTransformer3DModel": SweepSpec(
        {"patch_size": [1, 2, 2], "in_channels": 4, "hidden_size": 32, "num_attention_heads": 2, "text_dim": 16, "num_layers": 2,
         "rope_dim_list": [4, 6, 6], "theta": 256},
        lambda s: {**_video(s, 4, 1, 4, 6, 16), "timestep": t(s) / 1000}),
    "JoyImageEditPlusTransformer3DModel": SweepSpec(
        {"patch_size": [1, 2, 2], "in_channels": 4, "hidden_size": 32, "num_attention_heads": 2, "text_dim": 16, "num_layers": 2,
         "rope_dim_list": [4, 6, 6], "theta": 256},
        lambda s: {"hidden_states": r(s, 1, 2, 4, 1, 2, 2), "encoder_hidden_states": r(s + 50, 1, 6, 16), "timestep": t(s) / 1000,
                   "shape_list": [[(1, 1, 1), (1, 1, 1)]], "return_dict": False}),
    "LTX2VideoTransformer3DModel": SweepSpec(
        {"in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2, "attention_head_dim": 8,
         "cross_attention_dim": 16, "audio_in_channels": 4, "audio_out_channels": 4, "audio_num_attention_heads": 2,
         "audio_attention_head_dim": 4, "audio_cross_attention_dim": 8, "num_layers": 2, "qk_norm": "rms_norm_across_heads",
         "caption_channels": 16, "rope_double_precision": False},
        _ltx2),
    "MiniMaxH3Transformer3DModel": SweepSpec(
        {"num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 24, "num_layers": 2, "num_refiner_layers": 1,
         "ffn_dim": 32, "in_channels": 4, "audio_in_channels": 6, "patch_size": (1, 2, 2), "text_dim": 8, "freq_dim": 8,
         "time_embed_hidden_dim": 24, "time_embed_dim": 16, "rope_freq_dim": 2},
        _minimax_h3),
    "MotifVideoTransformer3DModel": SweepSpec(
        {"in_channels": 9, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 12, "num_layers": 2,
         "num_single_layers": 1, "num_decoder_layers": 0, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1,
         "qk_norm": "rms_norm", "norm_type": "layer_norm", "text_embed_dim": 16, "image_embed_dim": 4, "rope_theta": 256.0,
         "rope_axes_dim": (4, 4, 4), "enable_text_cross_attention_dual": False, "enable_text_cross_attention_single": False},
        lambda s: {**_video(s, 9, 1, 4, 6, 16), "timestep": t(s).long()}),
    "WanAnimateTransformer3DModel": SweepSpec(
        {**_WAN_LIKE, "in_channels": 12, "latent_channels": 4, "qk_norm": "rms_norm_across_heads", "image_dim": 16,
         "motion_encoder_channel_sizes": {"4": 16, "8": 16, "16": 16}, "motion_encoder_size": 16, "motion_style_dim": 8,
         "motion_dim": 4, "motion_encoder_dim": 16, "face_encoder_hidden_dim": 16, "face_encoder_num_heads": 2,
         "inject_face_latents_blocks": 2},
        _wan_animate),
    "WanAnimate2Transformer3DModel": SweepSpec(
        {"patch_size": (1, 2, 2), "text_len": 8, "in_dim": 36, "dim": 24, "ffn_dim": 32, "freq_dim": 32, "text_dim": 32,
         "out_dim": 16, "num_heads": 2, "num_layers": 2, "cross_attn_norm": True, "use_img_emb": True},
        _wan_animate2),
}
