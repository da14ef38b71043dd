"""Write videos in [-1, 1] as an animated GIF and as a PNG strip of frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _frames_uint8(video: torch.Tensor, scale: int) -> list[Image.Image]:
    v = video.detach().float().cpu()
    if v.dim() == 5:
        v = v[0]
    if v.dim() != 4 or v.shape[0] != 3:
        raise ValueError(f"expected a video (3, F, H, W) or (1, 3, F, H, W), got {tuple(video.shape)}")
    arr = ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    size = (arr.shape[2] * scale, arr.shape[1] * scale)
    return [Image.fromarray(frame).resize(size, Image.NEAREST) for frame in arr]


def write_gif(video: torch.Tensor, path: Path, scale: int = 4, fps: int = 6) -> Path:
    frames = _frames_uint8(video, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


def write_strip(videos: dict[str, torch.Tensor], path: Path, scale: int = 3) -> Path:
    """One row of frames per video (rows in dict order), separated by a thin gap."""
    rows = [np.concatenate([np.asarray(f) for f in _frames_uint8(v, scale)], axis=1) for v in videos.values()]
    gap = np.full((2, rows[0].shape[1], 3), 255, dtype=np.uint8)
    stacked = np.concatenate([x for row in rows for x in (row, gap)][:-1], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(stacked).save(path)
    return path
