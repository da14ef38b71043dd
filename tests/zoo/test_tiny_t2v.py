"""Checks of the shipped text-to-video models ("tiny" and "deep"): data, tokenizer, pipeline, fidelity.

The fidelity checks are why the model exists: it must follow its prompt, guidance must
change the result, and skipping every other transformer call must cost visible quality
(a random-weight model would make every cache look free).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

from mixcache_compile.zoo import HEIGHT, MODELS, NUM_FRAMES, TEXT_LEN, WIDTH, default_call_kwargs, load_pipeline
from mixcache_compile.zoo.checks import describe, follows_prompt, psnr
from mixcache_compile.zoo.data import Clip, all_clips, render_clip, sample_batch
from mixcache_compile.zoo.pipeline import WEIGHTS_FILE, load_config
from mixcache_compile.zoo.text import TinyTextEncoder, WordTokenizer

# 16 prompts: every colour x direction once, shapes alternating; one seed each.
PROMPT_SET: list[tuple[Clip, int]] = [
    (clip, 100 + i)
    for i, clip in enumerate(c for j, c in enumerate(all_clips()) if (j // 4) % 2 == j % 2)
]
STEPS = 30
GUIDANCE = 5.0


# ---------------------------------------------------------------- data and checks


def test_data_is_deterministic_and_in_range() -> None:
    a, pa = sample_batch(6, torch.Generator().manual_seed(3))
    b, pb = sample_batch(6, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and pa == pb
    assert a.shape == (6, 3, NUM_FRAMES, HEIGHT, WIDTH)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert all(len(p.split()) == 4 and p.split()[2] == "moving" for p in pa)


def test_checks_read_ground_truth_clips() -> None:
    gen = torch.Generator().manual_seed(0)
    clips = all_clips() * 3
    read = [(clip, describe(render_clip(clip, gen))) for clip in clips]
    assert all(c == clip.colour and d == clip.direction for clip, (c, _, d) in read)
    shape_hits = sum(s == clip.shape for clip, (_, s, _) in read)
    assert shape_hits >= 0.95 * len(clips)  # shape is informative only: small discs look boxy


def test_psnr() -> None:
    x = torch.zeros(2, 3)
    assert psnr(x, x) == float("inf")
    assert psnr(x, x + 0.02) == pytest.approx(40.0)  # 10 log10(2^2 / 0.02^2)


# ---------------------------------------------------------------- tokenizer and encoder


def test_tokenizer_matches_wan_call_convention() -> None:
    tok = WordTokenizer()
    out = tok(
        ["Red  CIRCLE moving left!", "", "purple blob"],
        padding="max_length",
        max_length=TEXT_LEN,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    assert out.input_ids.shape == out.attention_mask.shape == (3, TEXT_LEN)
    assert out.attention_mask.sum(dim=1).tolist() == [5, 1, 3]  # words + eos; "" is just eos
    assert out.input_ids[0, :5].tolist() == tok.encode("red circle moving left")
    assert out.input_ids[2, :2].tolist() == [tok.unk_token_id] * 2
    truncated = tok("red red red red", padding="max_length", max_length=3, truncation=True)
    assert truncated.input_ids[0, -1].item() == tok.eos_token_id


def test_encoder_zeroes_padding() -> None:
    enc = TinyTextEncoder(vocab_size=14, dim=8, num_heads=2, ffn_dim=16, max_positions=32)
    tok = WordTokenizer()("blue square", padding="max_length", max_length=8, truncation=True)
    h = enc(tok.input_ids, tok.attention_mask).last_hidden_state
    assert h.shape == (1, 8, 8)
    assert h[0, 3:].abs().sum() == 0 and h[0, :3].abs().sum() > 0


# ---------------------------------------------------------------- the shipped pipeline


@pytest.fixture(scope="module", params=sorted(MODELS))
def pipe(request: pytest.FixtureRequest) -> WanPipeline:
    """Every shipped model passes the same checks."""
    p = load_pipeline(name=request.param)
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe: WanPipeline, prompts: list[str], seeds: list[int], **overrides: Any) -> torch.Tensor:
    kwargs = default_call_kwargs(num_inference_steps=STEPS, guidance_scale=GUIDANCE) | overrides
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt=prompts, negative_prompt=[kwargs.pop("negative_prompt")] * len(prompts), generator=gens, **kwargs).frames


@pytest.fixture(scope="module")
def guided(pipe: WanPipeline) -> torch.Tensor:
    """The prompt set at 30 steps, guidance 5, one batched call."""
    return generate(pipe, [c.prompt for c, _ in PROMPT_SET], [s for _, s in PROMPT_SET])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_are_small(name: str) -> None:
    assert (MODELS[name] / WEIGHTS_FILE.name).stat().st_size <= 20 * 2**20


def test_deep_model_is_deeper_and_has_more_tokens() -> None:
    tiny, deep = load_config(MODELS["tiny"])["transformer"], load_config(MODELS["deep"])["transformer"]
    tokens = {name: NUM_FRAMES // c["patch_size"][0] * (HEIGHT // c["patch_size"][1]) * (WIDTH // c["patch_size"][2])
              for name, c in (("tiny", tiny), ("deep", deep))}
    assert deep["num_layers"] >= 8 and tokens["deep"] >= 128
    assert tokens == {"tiny": 64, "deep": 128}


def test_unknown_model_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown shipped model 'huge'.*tiny, deep"):
        load_pipeline(name="huge")


def test_pipeline_is_a_wan_pipeline_with_pixel_sizes(pipe: WanPipeline) -> None:
    assert isinstance(pipe, WanPipeline) and isinstance(pipe.transformer, WanTransformer3DModel)
    assert pipe.vae is None
    out = pipe(prompt="green square moving up", num_inference_steps=2, num_frames=6,
               generator=torch.Generator().manual_seed(0)).frames
    assert out.shape == (1, 3, 6, HEIGHT, WIDTH)  # exactly the frames asked for
    assert out.min() >= -1.0 and out.max() <= 1.0
    patch_t = pipe.transformer.config.patch_size[0]
    if patch_t > 1:  # the deep model has one token row per frame: any frame count works
        with pytest.raises(ValueError, match="temporal patch"):
            pipe(prompt="green square moving up", num_inference_steps=1, num_frames=patch_t + 1)


def test_pipeline_is_deterministic_and_shows_progress(pipe: WanPipeline) -> None:
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, disable=False)
    try:
        a = pipe(prompt="blue circle moving down", num_inference_steps=3,
                 generator=torch.Generator().manual_seed(1)).frames
    finally:
        pipe.set_progress_bar_config(disable=True)
    b = pipe(prompt="blue circle moving down", num_inference_steps=3,
             generator=torch.Generator().manual_seed(1)).frames
    assert torch.equal(a, b)
    assert "3/3" in stream.getvalue()


def test_follows_prompt(guided: torch.Tensor) -> None:
    hits = [follows_prompt(video, clip) for video, (clip, _) in zip(guided, PROMPT_SET)]
    misses = [(clip.prompt, describe(v)) for v, (clip, _), ok in zip(guided, PROMPT_SET, hits) if not ok]
    assert sum(hits) >= 0.9 * len(hits), misses


def test_guidance_matters(pipe: WanPipeline, guided: torch.Tensor) -> None:
    clip, seed = PROMPT_SET[0]
    unguided = generate(pipe, [clip.prompt], [seed], guidance_scale=1.0)
    assert psnr(guided[:1], unguided) < 25.0


@contextmanager
def every_other_step(transformer: torch.nn.Module, calls_per_step: int = 2) -> Iterator[None]:
    """Skip the transformer on odd steps and reuse the previous step's output of the same
    branch (the pipeline calls cond then uncond once per step under CFG)."""
    original = transformer.forward
    last: dict[int, Any] = {}
    calls = 0

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        step, branch = divmod(calls, calls_per_step)
        calls += 1
        if step % 2 == 1 and branch in last:
            return last[branch]
        last[branch] = original(*args, **kwargs)
        return last[branch]

    transformer.forward = forward  # instance attribute shadows the class method
    try:
        yield
    finally:
        del transformer.forward


def test_every_other_step_cache_is_not_free(pipe: WanPipeline, guided: torch.Tensor) -> None:
    subset = PROMPT_SET[:4]
    with every_other_step(pipe.transformer):
        cached = generate(pipe, [c.prompt for c, _ in subset], [s for _, s in subset])
    scores = [psnr(a, b) for a, b in zip(guided[: len(subset)], cached)]
    assert sum(scores) / len(scores) < 35.0, scores
