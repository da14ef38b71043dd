"""Tiny random-weight configs of the image and audio transformer classes added to the model sweep
(``tests/passes/test_model_sweep.py``; the first batch is in ``tests/tiny_models_sweep.py``).
Each entry: constructor kwargs, and a function of a seed giving one batch-1 call's keyword
arguments. Dims are minimal and chains have 1-2 blocks, so Dynamo's trace stays short."""

from __future__ import annotations

from typing import Any

import torch

from tests.tiny_models_sweep_base import SweepSpec, r, t


def _ideogram4(seed: int) -> dict[str, Any]:
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET,
        LLM_TOKEN_INDICATOR,
        OUTPUT_IMAGE_INDICATOR,
    )

    text, image = 4, 4  # the sequence is text tokens then a 2x2 image grid
    hidden = torch.cat([torch.zeros(1, text, 16), r(seed, 1, image, 16)], dim=1)
    encoder = torch.cat([r(seed + 50, 1, text, 24), torch.zeros(1, image, 24)], dim=1)
    pos = torch.zeros(1, text + image, 3, dtype=torch.long)
    pos[0, :text] = torch.arange(text)[:, None]
    pos[0, text:, 0] = IMAGE_POSITION_OFFSET
    pos[0, text:, 1] = torch.tensor([0, 0, 1, 1]) + IMAGE_POSITION_OFFSET
    pos[0, text:, 2] = torch.tensor([0, 1, 0, 1]) + IMAGE_POSITION_OFFSET
    indicator = torch.tensor([[LLM_TOKEN_INDICATOR] * text + [OUTPUT_IMAGE_INDICATOR] * image])
    return {"hidden_states": hidden, "encoder_hidden_states": encoder, "timestep": t(seed) / 1000, "position_ids": pos,
            "segment_ids": torch.ones(1, text + image, dtype=torch.long), "indicator": indicator, "return_dict": False}


def _krea2(seed: int) -> dict[str, Any]:
    text, grid = 4, 2
    pos = torch.zeros(text + grid * grid, 3)
    pos[text:, 1] = torch.arange(grid).repeat_interleave(grid)
    pos[text:, 2] = torch.arange(grid).repeat(grid)
    mask = torch.ones(1, text, dtype=torch.bool)
    mask[:, -1] = False  # one padded text token: the boolean-mask path is exercised
    return {"hidden_states": r(seed, 1, grid * grid, 16), "encoder_hidden_states": r(seed + 50, 1, text, 3, 16),
            "timestep": t(seed) / 1000, "position_ids": pos, "encoder_attention_mask": mask, "return_dict": False}


def _omnigen(seed: int) -> dict[str, Any]:
    text, image_tokens = 24, 16  # an 8x8 latent, patch 2
    length = text + 1 + image_tokens
    return {"hidden_states": r(seed, 1, 4, 8, 8), "timestep": t(seed) / 1000,
            "input_ids": torch.randint(0, 10, (1, text), generator=torch.Generator().manual_seed(seed)),
            "input_img_latents": [r(seed + 3, 1, 4, 8, 8)], "input_image_sizes": {0: [[0, image_tokens]]},
            "attention_mask": torch.ones(1, length, length), "position_ids": torch.arange(length)[None],
            "return_dict": False}


def _cosmos3(seed: int) -> dict[str, Any]:
    side = 2
    tokens = side * side
    length = 2 + tokens
    vision = torch.arange(2, length)
    return {"input_ids": torch.tensor([1, 2]), "text_indexes": torch.tensor([0, 1]),
            "position_ids": torch.zeros(3, length, dtype=torch.long), "und_len": 2, "sequence_length": length,
            "vision_tokens": [r(seed, 1, 2, 1, side, side)], "vision_token_shapes": [(1, side, side)],
            "vision_sequence_indexes": vision, "vision_mse_loss_indexes": vision,
            "vision_timesteps": torch.full((tokens,), 0.9 - 0.1 * seed), "vision_noisy_frame_indexes": [torch.tensor([0])],
            "return_dict": False}


SPECS: dict[str, SweepSpec] = {
    "BriaFiboTransformer2DModel": SweepSpec(
        {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 1, "attention_head_dim": 8,
         "num_attention_heads": 2, "joint_attention_dim": 16, "text_encoder_dim": 8, "pooled_projection_dim": None,
         "axes_dims_rope": [0, 4, 4]},
        lambda s: {"hidden_states": r(s, 1, 16, 4), "encoder_hidden_states": r(s + 50, 1, 8, 16), "img_ids": torch.zeros(16, 3),
                   "txt_ids": torch.zeros(8, 3), "timestep": t(s) / 1000,
                   # one text-encoder layer per block (2 dual-stream + 1 single-stream)
                   "text_encoder_layers": [r(s + i, 1, 8, 8) for i in (1, 2, 3)], "return_dict": False}),
    "ErnieImageTransformer2DModel": SweepSpec(
        {"hidden_size": 16, "num_attention_heads": 1, "num_layers": 2, "ffn_hidden_size": 16, "in_channels": 4,
         "out_channels": 4, "patch_size": 1, "text_in_dim": 16, "rope_theta": 256, "rope_axes_dim": (8, 4, 4)},
        lambda s: {"hidden_states": r(s, 1, 4, 4, 4), "timestep": t(s) / 1000, "text_bth": r(s + 50, 1, 6, 16),
                   "text_lens": torch.tensor([5]), "return_dict": False}),
    "Flux2Transformer2DModel": SweepSpec(
        {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "timestep_guidance_channels": 32, "axes_dims_rope": [4, 4, 4, 4]},
        lambda s: {"hidden_states": r(s, 1, 16, 4), "encoder_hidden_states": r(s + 50, 1, 8, 32),
                   "img_ids": torch.zeros(1, 16, 4, dtype=torch.long), "txt_ids": torch.zeros(1, 8, 4, dtype=torch.long),
                   "timestep": t(s) / 1000, "guidance": torch.tensor([3.5]), "return_dict": False}),
    "GlmImageTransformer2DModel": SweepSpec(
        {"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
         "text_embed_dim": 16, "time_embed_dim": 16, "condition_dim": 8, "prior_vq_quantizer_codebook_size": 16},
        lambda s: {"hidden_states": r(s, 1, 4, 8, 8), "encoder_hidden_states": r(s + 50, 1, 6, 16),
                   "prior_token_id": torch.tensor([3]), "prior_token_drop": torch.tensor([False]), "timestep": t(s).long(),
                   "target_size": torch.tensor([[64.0, 64.0]]), "crop_coords": torch.tensor([[0.0, 0.0]]), "return_dict": False}),
    "HiDreamImageTransformer2DModel": SweepSpec(
        {"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2, "num_single_layers": 1, "attention_head_dim": 8,
         "num_attention_heads": 2, "caption_channels": [8, 4], "text_emb_dim": 8, "num_routed_experts": 2,
         "num_activated_experts": 2, "axes_dims_rope": (4, 2, 2), "max_resolution": (8, 8), "llama_layers": (0, 1),
         "force_inference_output": True},
        lambda s: {"hidden_states": r(s, 1, 4, 8, 8), "encoder_hidden_states_t5": r(s + 50, 1, 4, 8),
                   "encoder_hidden_states_llama3": r(s + 51, 2, 1, 4, 4), "pooled_embeds": r(s + 52, 1, 8),
                   "timesteps": t(s).long(), "return_dict": False}),
    "Ideogram4Transformer2DModel": SweepSpec(
        {"in_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "intermediate_size": 16,
         "adaln_dim": 16, "llm_features_dim": 24, "mrope_section": (2, 1, 1)},
        _ideogram4),
    "Krea2Transformer2DModel": SweepSpec(
        {"in_channels": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
         "intermediate_size": 16, "timestep_embed_dim": 8, "text_hidden_dim": 16, "num_text_layers": 3,
         "text_num_attention_heads": 2, "text_num_key_value_heads": 1, "text_intermediate_size": 16,
         "num_layerwise_text_blocks": 1, "num_refiner_text_blocks": 1, "axes_dims_rope": (4, 2, 2), "rope_theta": 1000.0},
        _krea2),
    "NucleusMoEImageTransformer2DModel": SweepSpec(
        {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
         "joint_attention_dim": 16, "axes_dims_rope": (8, 4, 4), "moe_enabled": False},
        lambda s: {"hidden_states": r(s, 1, 16, 16), "encoder_hidden_states": r(s + 50, 1, 8, 16),
                   "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long), "timestep": t(s) / 1000,
                   "img_shapes": [(1, 4, 4)], "return_dict": False}),
    "OmniGenTransformer2DModel": SweepSpec(
        {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 32, "num_layers": 2,
         "pad_token_id": 0, "vocab_size": 32, "in_channels": 4, "time_step_dim": 4,
         "rope_scaling": {"long_factor": [1, 2, 3, 4], "short_factor": [1, 2, 3, 4]}},
        _omnigen),
    "PRXTransformer2DModel": SweepSpec(
        {"in_channels": 4, "patch_size": 2, "context_in_dim": 16, "hidden_size": 32, "mlp_ratio": 2.0, "num_heads": 2,
         "depth": 2, "axes_dim": [8, 8]},
        lambda s: {"hidden_states": r(s, 1, 4, 8, 8), "encoder_hidden_states": r(s + 50, 1, 6, 16), "timestep": t(s) / 1000,
                   "return_dict": False}),
    "ZImageTransformer2DModel": SweepSpec(
        {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 4, "dim": 16, "n_layers": 2, "n_refiner_layers": 1,
         "n_heads": 1, "n_kv_heads": 1, "qk_norm": True, "cap_feat_dim": 16, "rope_theta": 256.0, "t_scale": 1000.0,
         "axes_dims": [8, 4, 4], "axes_lens": [64, 16, 16]},
        lambda s: {"x": [r(s, 4, 1, 8, 8)], "cap_feats": [r(s + 50, 8, 16)], "t": t(s) / 1000, "return_dict": False}),
    "Cosmos3OmniTransformer": SweepSpec(
        {"head_dim": 6, "hidden_act": "relu2", "hidden_size": 12, "intermediate_size": 24, "latent_channel": 2,
         "latent_patch_size": 1, "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1,
         "patch_latent_dim": 2, "qk_norm_for_text": False, "rope_axes_dim": [1, 1, 1], "rope_theta": 1e8, "vocab_size": 32},
        _cosmos3),
    # Audio.
    "AceStepTransformer1DModel": SweepSpec(
        {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 16, "in_channels": 24, "audio_acoustic_hidden_dim": 8, "patch_size": 2, "rope_theta": 10000.0,
         "sliding_window": 16},
        lambda s: {"hidden_states": r(s, 1, 8, 8), "timestep": t(s) / 1000, "timestep_r": t(s) / 2000,
                   "encoder_hidden_states": r(s + 50, 1, 6, 32), "context_latents": r(s + 3, 1, 8, 16), "return_dict": False}),
    "LongCatAudioDiTTransformer": SweepSpec(
        {"dit_dim": 32, "dit_depth": 2, "dit_heads": 2, "dit_text_dim": 16, "latent_dim": 8, "text_conv": False},
        lambda s: {"hidden_states": r(s, 1, 16, 8), "encoder_hidden_states": r(s + 50, 1, 6, 16),
                   "encoder_attention_mask": torch.tensor([[True] * 5 + [False]]), "attention_mask": torch.ones(1, 16, dtype=torch.bool),
                   "timestep": t(s) / 1000, "return_dict": False}),
    "MiniMaxMusic3Transformer1DModel": SweepSpec(
        {"in_channels": 8, "condition_dim": 16, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
         "ff_inner_dim": 32, "rotary_dim": 4, "fourier_embedding_dim": 8},
        lambda s: {"hidden_states": r(s, 1, 8, 24), "encoder_hidden_states": r(s + 50, 1, 24, 16), "timestep": t(s) / 1000,
                   "return_dict": False}),
    "StableAudio3DiTModel": SweepSpec(
        {"io_channels": 8, "patch_size": 1, "embed_dim": 32, "depth": 2, "num_heads": 2, "cond_token_dim": 16,
         "global_cond_dim": 12, "local_add_cond_dim": 5, "timestep_features_dim": 16, "ff_mult": 2, "num_memory_tokens": 2,
         "use_differential_attention": False},
        lambda s: {"hidden_states": r(s, 1, 8, 16), "timestep": t(s) / 1000, "encoder_hidden_states": r(s + 50, 1, 4, 16),
                   "global_hidden_states": r(s + 3, 1, 12), "return_dict": False}),
}
