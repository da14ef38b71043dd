"""Read a generated clip back: its colour, motion direction and shape, plus PSNR.

These let tests (and later fidelity reports) check that the tiny model follows its prompt
without any learned classifier: the content is simple enough to measure directly.
All functions take one video as (3, F, H, W) or (1, 3, F, H, W) in [-1, 1].
"""

from __future__ import annotations

import math

import torch

from .data import Clip
from .spec import COLOURS, DIRECTIONS
from ..eval.metrics import psnr  # noqa: F401  (one PSNR for the whole package)

# A pixel is foreground when its brightest channel exceeds the frame's typical (median)
# brightness by this much, in [0, 1] units. Backgrounds are <= 0.08, shapes' max channel ~1.
FOREGROUND_MARGIN = 0.3
# Below this centroid displacement (pixels, first to last frame) there is no clear motion.
MIN_DISPLACEMENT = 1.0
# Foreground fraction of the bounding box: ~pi/4 for a disc, ~1 for a square.
SQUARE_FILL = 0.89


def _single(video: torch.Tensor) -> torch.Tensor:
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected one video, got a batch of {video.shape[0]}")
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected (3, F, H, W), got {tuple(video.shape)}")
    return ((video.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def foreground(video: torch.Tensor) -> torch.Tensor:
    """Boolean (F, H, W) mask of pixels clearly brighter than their frame's background."""
    rgb = _single(video)
    brightness = rgb.amax(dim=0)  # (F, H, W)
    background = brightness.flatten(1).median(dim=1).values.view(-1, 1, 1)
    return brightness > background + FOREGROUND_MARGIN


def recover_colour(video: torch.Tensor) -> str | None:
    """Palette colour nearest to the mean foreground colour, or None without foreground."""
    rgb = _single(video)
    mask = foreground(video)
    if not mask.any():
        return None
    mean = rgb[:, mask].mean(dim=1)
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[c] for c in names])
    return names[int((palette - mean).norm(dim=1).argmin())]


def centroids(video: torch.Tensor) -> torch.Tensor:
    """(F, 2) foreground centroid (x, y) per frame; NaN for frames without foreground."""
    mask = foreground(video).float()
    f, h, w = mask.shape
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    area = mask.sum(dim=(1, 2))
    cx = (mask * xs).sum(dim=(1, 2)) / area
    cy = (mask * ys).sum(dim=(1, 2)) / area
    return torch.stack([cx, cy], dim=1)  # 0/0 -> NaN marks empty frames


def recover_direction(video: torch.Tensor) -> str | None:
    """Direction of the centroid's move from the first to the last frame, or None if unclear."""
    c = centroids(video)
    if torch.isnan(c[0]).any() or torch.isnan(c[-1]).any():
        return None
    dx, dy = (c[-1] - c[0]).tolist()
    if math.hypot(dx, dy) < MIN_DISPLACEMENT:
        return None
    step = (int(math.copysign(1, dx)), 0) if abs(dx) >= abs(dy) else (0, int(math.copysign(1, dy)))
    return next(name for name, unit in DIRECTIONS.items() if unit == step)


def recover_shape(video: torch.Tensor) -> str | None:
    """'square' or 'circle' from how much of its bounding box the shape fills (median over frames)."""
    fills = []
    for frame in foreground(video):
        ys, xs = torch.nonzero(frame, as_tuple=True)
        if len(ys) < 4:
            continue
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / float(box))
    if not fills:
        return None
    return "square" if sorted(fills)[len(fills) // 2] >= SQUARE_FILL else "circle"


def describe(video: torch.Tensor) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, direction) as read from the pixels."""
    return recover_colour(video), recover_shape(video), recover_direction(video)


def follows_prompt(video: torch.Tensor, clip: Clip) -> bool:
    """Colour and motion direction match the prompt (the checks the model is held to)."""
    return recover_colour(video) == clip.colour and recover_direction(video) == clip.direction
