"""Fidelity of a cached output against the uncached one: PSNR and SSIM over video frames.

Videos are tensors (batch, channels, frames, height, width) or (channels, frames, height,
width) with values in [-1, 1] (``data_range`` 2). SSIM is scikit-image's, averaged over
frames and batch items (channels as the channel axis).
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _as_frames(video: torch.Tensor) -> np.ndarray:
    """-> array (n_frames_total, height, width, channels)."""
    v = video.detach().float().cpu()
    if v.dim() == 4:
        v = v.unsqueeze(0)
    if v.dim() != 5:
        raise ValueError(f"expected a video (B, C, F, H, W) or (C, F, H, W), got shape {tuple(video.shape)}")
    return v.permute(0, 2, 3, 4, 1).reshape(-1, v.shape[3], v.shape[4], v.shape[1]).numpy()


def psnr(test: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB over all elements (any shape, videos included); ``inf`` when identical."""
    if test.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(test.shape)} vs {tuple(reference.shape)}")
    a = test.detach().double().cpu().numpy()
    b = reference.detach().double().cpu().numpy()
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(b, a, data_range=data_range))


def ssim(test: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM over frames (7x7 windows, or the frame size when smaller)."""
    if test.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(test.shape)} vs {tuple(reference.shape)}")
    a, b = _as_frames(test), _as_frames(reference)
    win = min(7, a.shape[1], a.shape[2])
    win -= 1 - win % 2  # odd
    scores = [
        structural_similarity(b[i], a[i], data_range=data_range, channel_axis=-1, win_size=win) for i in range(a.shape[0])
    ]
    return float(np.mean(scores))
