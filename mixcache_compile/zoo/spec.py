"""Fixed facts about the tiny text-to-video model: video size, vocabulary, palette, architecture.

Everything the data generator, the trainer and the loader must agree on lives here, so the
three cannot drift apart. The loader still reads the architecture back from weights/config.json
(written by the trainer from these values) so that shipped weights always load with the
configuration they were trained with.
"""

from __future__ import annotations

from typing import Any, Final

# Native video size, in pixels (the model works directly in pixel space, no VAE).
# WanPipeline.check_inputs demands height/width divisible by 16. 16x16 rather than 32x32:
# on one CPU core a 32x32 model did not learn motion within the training budget.
HEIGHT: Final[int] = 16
WIDTH: Final[int] = 16
NUM_FRAMES: Final[int] = 8

# Token budget of a prompt: "yellow square moving down" is 4 words + eos. The transformer's
# cross-attention also sees the zero-padded tail, so inference must use the training length.
TEXT_LEN: Final[int] = 16

COLOURS: Final[dict[str, tuple[float, float, float]]] = {
    # RGB in [0, 1]; saturated so the colour can be read back from generated pixels.
    "red": (0.95, 0.10, 0.10),
    "green": (0.10, 0.85, 0.20),
    "blue": (0.15, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.10),
}
SHAPES: Final[tuple[str, ...]] = ("circle", "square")
# Unit displacement per direction in image coordinates (x right, y down).
DIRECTIONS: Final[dict[str, tuple[int, int]]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
VOCAB: Final[tuple[str, ...]] = (PAD, EOS, UNK, *COLOURS, *SHAPES, "moving", *DIRECTIONS)

# diffusers.WanTransformer3DModel kwargs. Patch (2, 4, 4) keeps the token count at
# 4 frame pairs x 4 x 4 = 64: on one CPU core the number of training steps is what decides
# whether the model learns motion, so tokens are kept few.
TRANSFORMER_CONFIG: Final[dict[str, Any]] = {
    "patch_size": [2, 4, 4],
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "in_channels": 3,
    "out_channels": 3,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 256,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 64,
}

# The "deep" model: twice the blocks and twice the tokens. Patch (1, 4, 4) gives one token row
# per frame: 8 frames x 4 x 4 = 128 tokens. Width stays 128 so that the deep model can be grown
# from the trained 4-block one (see tools/train_tiny_t2v.py --preset deep): on one CPU thread a
# from-scratch 8-block run does not reach coherent motion inside the two-hour budget.
DEEP_TRANSFORMER_CONFIG: Final[dict[str, Any]] = {
    **TRANSFORMER_CONFIG,
    "patch_size": [1, 4, 4],
    "num_layers": 8,
}

ENCODER_CONFIG: Final[dict[str, Any]] = {
    "vocab_size": len(VOCAB),
    "dim": 64,
    "num_heads": 2,
    "ffn_dim": 128,
    "max_positions": 512,  # WanPipeline's own default max_sequence_length
}

# Training draws sigma uniformly through this shift (as a shift-2 sampler would visit them)...
TRAIN_SIGMA_SHIFT: Final[float] = 2.0
# ...while the shipped FlowMatchEulerDiscreteScheduler uses a stronger shift: it spends more of
# the 30 steps at high noise, where layout and motion are decided, so prompt following holds
# and skipping steps has a visible cost (with shift 2 every-other-step reuse scored ~37 dB).
SCHEDULER_SHIFT: Final[float] = 6.0


def prompt_for(colour: str, shape: str, direction: str) -> str:
    return f"{colour} {shape} moving {direction}"
