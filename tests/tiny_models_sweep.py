"""Tiny random-weight configs of more diffusers transformer classes, for the model sweep
(``tests/passes/test_model_sweep.py``). Each entry: constructor kwargs, and a function of a
seed giving the keyword arguments of one batch-1 call. Sizes are minimal (2 blocks per
chain where the class allows it) so an eager call takes milliseconds.

``EXACT_TESTED`` names the classes ``tests/tiny_models.py`` builds (swept by
``tests/passes/test_models_exact.py``); ``NOT_SWEPT`` gives, for every other class of
``diffusers.models.transformers``, why it has no tiny config here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tests.tiny_models_sweep_base import SweepSpec, r, t
from tests.tiny_models_sweep_extra import NOT_SWEPT as _extra_not_swept
from tests.tiny_models_sweep_extra import SPECS as _extra_specs
from tests.tiny_models_sweep_image import SPECS as _image_specs
from tests.tiny_models_sweep_video import SPECS as _video_specs


_r, _t = r, t


def _flux_like(seed: int, channels: int = 4, text: int = 8, dim: int = 32, guidance: bool = False) -> dict[str, Any]:
    out = {"hidden_states": _r(seed, 1, 16, channels), "encoder_hidden_states": _r(seed + 50, 1, text, dim),
           "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(text, 3), "timestep": _t(seed) / 1000, "return_dict": False}
    if guidance:
        out["guidance"] = torch.tensor([3.5])
    return out


def _video(seed: int, channels: int, frames: int, size: int, text: int, dim: int) -> dict[str, Any]:
    return {"hidden_states": _r(seed, 1, channels, frames, size, size), "encoder_hidden_states": _r(seed + 50, 1, text, dim),
            "timestep": _t(seed), "return_dict": False}


def _image(seed: int, channels: int, size: int, text: int, dim: int) -> dict[str, Any]:
    return {"hidden_states": _r(seed, 1, channels, size, size), "encoder_hidden_states": _r(seed + 50, 1, text, dim),
            "timestep": _t(seed), "return_dict": False}


_WAN_LIKE = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4,
             "text_dim": 16, "freq_dim": 32, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
             "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}

SPECS: dict[str, SweepSpec] = {
    "DiTTransformer2DModel": SweepSpec(
        {"in_channels": 4, "out_channels": 8, "num_attention_heads": 2, "attention_head_dim": 4, "num_layers": 2,
         "norm_type": "ada_norm_zero", "num_embeds_ada_norm": 8, "patch_size": 2, "sample_size": 8},
        lambda s: {"hidden_states": _r(s, 1, 4, 8, 8), "timestep": _t(s).long(), "class_labels": torch.tensor([1]), "return_dict": False}),
    "LatteTransformer3DModel": SweepSpec(
        {"sample_size": 8, "num_layers": 2, "patch_size": 2, "attention_head_dim": 4, "num_attention_heads": 2,
         "caption_channels": 8, "in_channels": 4, "cross_attention_dim": 8, "out_channels": 8, "norm_type": "ada_norm_single",
         "norm_elementwise_affine": False, "norm_eps": 1e-6, "num_embeds_ada_norm": 1000},
        lambda s: {**_video(s, 4, 1, 8, 8, 8), "timestep": _t(s).long()}),
    "AllegroTransformer3DModel": SweepSpec(
        {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4, "num_layers": 2,
         "cross_attention_dim": 16, "sample_width": 8, "sample_height": 8, "sample_frames": 8, "caption_channels": 8},
        lambda s: {**_video(s, 4, 2, 8, 16, 8), "timestep": _t(s).long()}),
    "AuraFlowTransformer2DModel": SweepSpec(
        {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_mmdit_layers": 2, "num_single_dit_layers": 2,
         "attention_head_dim": 8, "num_attention_heads": 2, "caption_projection_dim": 16, "joint_attention_dim": 16,
         "out_channels": 4, "pos_embed_max_size": 64},
        lambda s: _image(s, 4, 8, 8, 16)),
    "ChromaTransformer2DModel": SweepSpec(
        {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": [4, 4, 8], "approximator_num_channels": 8,
         "approximator_hidden_dim": 16, "approximator_layers": 1},
        lambda s: _flux_like(s)),
    "BriaTransformer2DModel": SweepSpec(
        {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 8,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": None, "axes_dims_rope": [0, 4, 4]},
        lambda s: _flux_like(s)),
    "LongCatImageTransformer2DModel": SweepSpec(
        {"patch_size": 1, "in_channels": 4, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 4, 8]},
        lambda s: _flux_like(s, guidance=True)),
    "OvisImageTransformer2DModel": SweepSpec(
        {"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 4, 8)},
        lambda s: _flux_like(s)),
    "CogView3PlusTransformer2DModel": SweepSpec(
        {"patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 4, "num_attention_heads": 2,
         "out_channels": 4, "text_embed_dim": 8, "time_embed_dim": 8, "condition_dim": 2, "pos_embed_max_size": 8, "sample_size": 8},
        lambda s: {**_image(s, 4, 8, 8, 8), "timestep": _t(s).long(), "original_size": torch.tensor([[64, 64]]),
                   "target_size": torch.tensor([[64, 64]]), "crop_coords": torch.tensor([[0, 0]])}),
    "CogView4Transformer2DModel": SweepSpec(
        {"patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 4, "num_attention_heads": 4,
         "out_channels": 4, "text_embed_dim": 8, "time_embed_dim": 8, "condition_dim": 4},
        lambda s: {**_image(s, 4, 8, 8, 8), "timestep": _t(s).long(), "original_size": torch.tensor([[64, 64]]),
                   "target_size": torch.tensor([[64, 64]]), "crop_coords": torch.tensor([[0, 0]])}),
    "CosmosTransformer3DModel": SweepSpec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 12, "num_layers": 2,
         "mlp_ratio": 2, "text_embed_dim": 16, "adaln_lora_dim": 4, "max_size": (4, 32, 32), "patch_size": (1, 2, 2),
         "rope_scale": (2.0, 1.0, 1.0), "concat_padding_mask": False, "extra_pos_embed_type": "learnable"},
        # concat_padding_mask=False: resizing the padding mask needs torchvision, not installed here.
        lambda s: {**_video(s, 4, 1, 8, 6, 16), "attention_mask": torch.ones(1, 6), "fps": 30}),
    "EasyAnimateTransformer3DModel": SweepSpec(
        {"attention_head_dim": 16, "num_attention_heads": 2, "in_channels": 4, "mmdit_layers": 2, "num_layers": 2,
         "out_channels": 4, "patch_size": 2, "sample_height": 60, "sample_width": 90, "text_embed_dim": 16,
         "time_embed_dim": 8, "time_position_encoding_type": "3d_rope", "timestep_activation_fn": "silu"},
        lambda s: _video(s, 4, 2, 8, 8, 16)),
    "LuminaNextDiT2DModel": SweepSpec(
        {"sample_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 24, "num_layers": 2, "num_attention_heads": 3,
         "num_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": None, "norm_eps": 1e-5, "learn_sigma": False,
         "qk_norm": True, "cross_attention_dim": 32, "scaling_factor": 1.0},
        lambda s: {**_image(s, 4, 8, 8, 32), "timestep": _t(s) / 1000, "encoder_mask": torch.ones(1, 8),
                   "image_rotary_emb": _r(s + 99, 384, 384, 4), "cross_attention_kwargs": {}}),
    "Lumina2Transformer2DModel": SweepSpec(
        {"sample_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 24, "num_layers": 2, "num_refiner_layers": 1,
         "num_attention_heads": 3, "num_kv_heads": 1, "multiple_of": 2, "ffn_dim_multiplier": None, "norm_eps": 1e-5,
         "scaling_factor": 1.0, "axes_dim_rope": (4, 2, 2), "axes_lens": (128, 128, 128), "cap_feat_dim": 32},
        lambda s: {**_image(s, 4, 8, 8, 32), "timestep": _t(s) / 1000, "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool)}),
    "MochiTransformer3DModel": SweepSpec(
        {"patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "pooled_projection_dim": 16,
         "in_channels": 4, "out_channels": None, "qk_norm": "rms_norm", "text_embed_dim": 16, "time_embed_dim": 4,
         "activation_fn": "swiglu", "max_sequence_length": 8},
        lambda s: {**_video(s, 4, 2, 8, 8, 16), "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool)}),
    "SanaTransformer2DModel": SweepSpec(
        {"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 2, "attention_head_dim": 4, "num_attention_heads": 2,
         "num_cross_attention_heads": 2, "cross_attention_head_dim": 4, "cross_attention_dim": 8, "caption_channels": 8,
         "sample_size": 8},
        lambda s: _image(s, 4, 8, 8, 8)),
    "SanaVideoTransformer3DModel": SweepSpec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 12, "num_layers": 2,
         "num_cross_attention_heads": 2, "cross_attention_head_dim": 12, "cross_attention_dim": 24, "caption_channels": 16,
         "mlp_ratio": 2.5, "sample_size": 8, "patch_size": (1, 2, 2), "norm_elementwise_affine": False, "norm_eps": 1e-6,
         "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32},
        lambda s: _video(s, 4, 2, 8, 8, 16)),
    "SkyReelsV2Transformer3DModel": SweepSpec(dict(_WAN_LIKE), lambda s: _video(s, 4, 2, 8, 8, 16)),
    "ChronoEditTransformer3DModel": SweepSpec(
        {**_WAN_LIKE, "attention_head_dim": 8, "rope_max_seq_len": 64, "rope_temporal_skip_len": 8},
        lambda s: _video(s, 4, 2, 8, 8, 16)),
    "WanVACETransformer3DModel": SweepSpec(
        {**_WAN_LIKE, "num_layers": 4, "vace_layers": [0, 2], "vace_in_channels": 12},
        lambda s: {**_video(s, 4, 2, 8, 8, 16), "control_hidden_states": _r(s + 7, 1, 12, 2, 8, 8)}),
    "HunyuanDiT2DModel": SweepSpec(
        {"sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
         "cross_attention_dim": 8, "cross_attention_dim_t5": 8, "pooled_projection_dim": 4, "hidden_size": 16,
         "text_len": 4, "text_len_t5": 4, "activation_fn": "gelu-approximate"},
        lambda s: {**_image(s, 4, 8, 4, 8), "text_embedding_mask": torch.ones(1, 4), "encoder_hidden_states_t5": _r(s + 3, 1, 4, 8),
                   "text_embedding_mask_t5": torch.ones(1, 4), "image_meta_size": torch.tensor([[1024.0, 1024, 16, 16, 0, 0]]),
                   "style": torch.zeros(1, dtype=torch.long), "image_rotary_emb": [torch.ones(16, 8), torch.zeros(16, 8)]}),
    "QwenImageTransformer2DModel": SweepSpec(
        {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
         "joint_attention_dim": 16, "guidance_embeds": False, "axes_dims_rope": (8, 4, 4)},
        lambda s: {"hidden_states": _r(s, 1, 16, 16), "encoder_hidden_states": _r(s + 50, 1, 8, 16),
                   "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long), "timestep": _t(s) / 1000,
                   "img_shapes": [(1, 4, 4)], "return_dict": False}),
}

# tests/tiny_models.py MODELS: swept with eager and inductor engines, batch 1 and 2.
EXACT_TESTED = {
    "WanTransformer3DModel", "CogVideoXTransformer3DModel", "HunyuanVideoTransformer3DModel", "FluxTransformer2DModel",
    "PixArtTransformer2DModel", "SD3Transformer2DModel", "LTXVideoTransformer3DModel",
}

_NOT_DIT = "not a denoising DiT with repeated blocks called by the pipeline's denoiser"
NOT_SWEPT: dict[str, str] = {
    "DualTransformer2DModel": _NOT_DIT + " (wraps two Transformer2DModels)",
    "TransformerTemporalModel": _NOT_DIT + " (a temporal layer inside UNets)",
    "PriorTransformer": _NOT_DIT + " (unCLIP prior over embeddings)",
    "T5FilmDecoder": _NOT_DIT + " (spectrogram decoder)",
    "MiniMaxMusic3RVQDepthDecoder": _NOT_DIT + " (RVQ depth decoder)",
    "RFD4ProteinaTransformer": _NOT_DIT + " (protein structure model with its own frame inputs)",
}

# The configs of the later classes live in modules of their own (one job, under 500 lines each).
SPECS.update(_image_specs)
SPECS.update(_video_specs)
SPECS.update(_extra_specs)
NOT_SWEPT.update(_extra_not_swept)

# The classes the sweep test runs by default (the others are marked slow; see the test's
# docstring): one per planner path, each 5-20 s of Dynamo tracing on one core.
DEFAULT: set[str] = {
    "DiTTransformer2DModel",  # one chain
    "AuraFlowTransformer2DModel",  # two chains; single blocks not skippable
    "LongCatImageTransformer2DModel",  # dual-stream chain, then single-stream chain
    "WanVACETransformer3DModel",  # two chains of different lengths
    "LatteTransformer3DModel",  # falls back: spatial and temporal blocks interleave
    "GlmImageTransformer2DModel",  # falls back: a boolean-mask write breaks the graph
    "OmniGenTransformer2DModel",  # falls back: a Python branch on a tensor breaks the graph
    "Krea2Transformer2DModel",  # plans with a padded boolean text mask (FLOPs still counted)
    "Kandinsky6SRTransformer3DModel",  # torch.func.vmap inside each block (passes/state_regions.py)
    "ErnieImageTransformer2DModel",  # shared AdaLN
    "SanaTransformer2DModel",  # linear attention
    "QwenImageTransformer2DModel",  # list-of-shapes input
    "Cosmos3OmniTransformer",  # LLM-style decoder over packed token indexes
    "MiniMaxMusic3Transformer1DModel",  # audio, 1-D
}


def build(name: str) -> tuple[torch.nn.Module, Callable[[int], dict[str, Any]]]:
    import diffusers

    spec = SPECS[name]
    torch.manual_seed(0)
    model = getattr(diffusers, name)(**spec.config).eval()
    if spec.with_model:
        return model, lambda seed: spec.inputs(seed, model)
    return model, spec.inputs
