"""A tiny trained text-to-video DiT (diffusers WanTransformer3DModel) shipped with the package.

    from mixcache_compile.zoo import load_pipeline, default_call_kwargs
    pipe = load_pipeline()
    video = pipe(prompt="red circle moving left", generator=torch.Generator().manual_seed(0),
                 **default_call_kwargs()).frames      # (1, 3, 8, 16, 16) in [-1, 1]

    deep = load_pipeline(name="deep")                   # 8 blocks, 128 tokens (zoo.MODELS)

See MODEL_CARD.md for data, architecture, training and measured figures.
"""

from .pipeline import (
    DEFAULT_MODEL,
    MODELS,
    TinyWanPipeline,
    default_call_kwargs,
    load_config,
    load_pipeline,
    load_text_encoder,
    load_transformer,
    weights_dir_for,
)
from .spec import HEIGHT, NUM_FRAMES, TEXT_LEN, WIDTH

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "HEIGHT",
    "NUM_FRAMES",
    "TEXT_LEN",
    "WIDTH",
    "TinyWanPipeline",
    "default_call_kwargs",
    "load_config",
    "load_pipeline",
    "load_text_encoder",
    "load_transformer",
    "weights_dir_for",
]
