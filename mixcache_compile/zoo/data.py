"""Procedural training videos: one coloured shape sliding across a dark background.

Each clip is rendered analytically (anti-aliased coverage of a circle or an axis-aligned
square), so the generator is cheap enough to produce every training batch on the fly and
is exactly reproducible from a torch.Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import COLOURS, DIRECTIONS, HEIGHT, NUM_FRAMES, SHAPES, WIDTH, prompt_for

_COLOUR_NAMES = tuple(COLOURS)
_DIRECTION_NAMES = tuple(DIRECTIONS)
_PALETTE = torch.tensor([COLOURS[c] for c in _COLOUR_NAMES])
_STEPS = torch.tensor([DIRECTIONS[d] for d in _DIRECTION_NAMES], dtype=torch.float32)

# Ranges in pixels: radius (or half side), speed per frame, and how far the middle of the path
# may sit from the frame centre. The spread is kept modest on purpose: a model trained for
# ~40 CPU minutes learns coherent motion only if the layout is not too uncertain.
SIZE_RANGE = (2.25, 3.0)
SPEED_RANGE = (0.7, 1.0)  # 4.9-7 px travelled over 8 frames
CENTRE_JITTER = 1.5
BACKGROUND_RANGE = (0.0, 0.06)  # brightness in [0, 1]: dark, never exactly constant


@dataclass(frozen=True)
class Clip:
    """What a clip shows; the prompt is derived from it."""

    colour: str
    shape: str
    direction: str

    @property
    def prompt(self) -> str:
        return prompt_for(self.colour, self.shape, self.direction)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def render(
    colour: torch.Tensor,
    shape: torch.Tensor,
    direction: torch.Tensor,
    gen: torch.Generator,
    num_frames: int = NUM_FRAMES,
    height: int = HEIGHT,
    width: int = WIDTH,
) -> torch.Tensor:
    """Render clips for index tensors (B,) into a (B, 3, F, H, W) video in [-1, 1].

    Size, speed, start position and background level are drawn from `gen`.
    """
    n = colour.shape[0]
    size = _uniform(n, *SIZE_RANGE, gen)
    speed = _uniform(n, *SPEED_RANGE, gen)
    step = _STEPS[direction] * speed[:, None]  # (B, 2) px per frame, (dx, dy)
    travel = step * (num_frames - 1)

    # The path's midpoint sits near the centre, so the shape stays (all but a sliver) inside
    # the frame throughout (worst case 7.5 + 1.5 + 3.5 + 3 = 15.5 on a 0..15 grid).
    centre_of_frame = torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0])
    jitter = CENTRE_JITTER * (2.0 * torch.rand(n, 2, generator=gen) - 1.0)
    start = centre_of_frame + jitter - travel / 2.0
    background = _uniform(n, *BACKGROUND_RANGE, gen)

    t = torch.arange(num_frames, dtype=torch.float32)
    centre = start[:, None, :] + t[None, :, None] * step[:, None, :]  # (B, F, 2)
    ys = torch.arange(height, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, width)
    dx = xs - centre[..., 0, None, None]
    dy = ys - centre[..., 1, None, None]
    r = size.view(n, 1, 1, 1)

    # Coverage ramps over one pixel at the edge, so the motion is sub-pixel smooth.
    disc = torch.clamp(r + 0.5 - torch.sqrt(dx * dx + dy * dy), 0.0, 1.0)
    box = torch.clamp(r + 0.5 - dx.abs(), 0.0, 1.0) * torch.clamp(r + 0.5 - dy.abs(), 0.0, 1.0)
    is_circle = (shape == SHAPES.index("circle")).view(n, 1, 1, 1)
    cover = torch.where(is_circle, disc, box)  # (B, F, H, W)

    rgb = _PALETTE[colour].view(n, 3, 1, 1, 1)
    bg = background.view(n, 1, 1, 1, 1)
    video = bg + (rgb - bg) * cover[:, None]
    return video * 2.0 - 1.0


def sample_batch(batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """A random batch of clips (B, 3, F, H, W) in [-1, 1] and their prompts."""
    colour = torch.randint(len(_COLOUR_NAMES), (batch_size,), generator=gen)
    shape = torch.randint(len(SHAPES), (batch_size,), generator=gen)
    direction = torch.randint(len(_DIRECTION_NAMES), (batch_size,), generator=gen)
    video = render(colour, shape, direction, gen)
    prompts = [
        prompt_for(_COLOUR_NAMES[c], SHAPES[s], _DIRECTION_NAMES[d])
        for c, s, d in zip(colour.tolist(), shape.tolist(), direction.tolist())
    ]
    return video, prompts


def render_clip(clip: Clip, gen: torch.Generator) -> torch.Tensor:
    """One clip with the given content (random size/speed/start), shape (1, 3, F, H, W)."""
    return render(
        torch.tensor([_COLOUR_NAMES.index(clip.colour)]),
        torch.tensor([SHAPES.index(clip.shape)]),
        torch.tensor([_DIRECTION_NAMES.index(clip.direction)]),
        gen,
    )


def all_clips() -> list[Clip]:
    """Every (colour, shape, direction) combination, in a fixed order."""
    return [Clip(c, s, d) for c in _COLOUR_NAMES for s in SHAPES for d in _DIRECTION_NAMES]
