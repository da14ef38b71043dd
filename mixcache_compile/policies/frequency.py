"""FasterCache's frequency split of the CFG difference (CFG-Cache).

With ``D = FFT2(delta)`` over the two spatial dims (H, W) of each frame, ``low(D)`` keeps a
centred disc of radius ``min(H, W) // divisor`` of the shifted spectrum and ``high(D)`` the
rest. Because the FFT is linear, ``low(FFT(u)) - low(FFT(c)) = low(FFT(u - c))``, so the two
stored differences dLF, dHF of the paper are the two halves of one stored ``delta = u - c``,
and the rebuild

    u = IFFT(low(FFT(c)) + w1*dLF + high(FFT(c)) + w2*dHF).real
      = c + IFFT(w1*low(D) + w2*high(D)).real

needs a single forward and inverse FFT of ``delta``. With ``w1 == w2 == w`` it is exactly
``c + w*delta`` (no FFT is run). The disc is built in the shifted layout (DC at index
``(H//2, W//2)``, as ``fftshift`` over (-2, -1) puts it) and moved back with ``ifftshift``, so
the spectrum itself is never shifted.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def _mask_cpu(height: int, width: int, divisor: int) -> torch.Tensor:
    radius = min(height, width) // divisor
    y = torch.arange(height).view(-1, 1) - height // 2
    x = torch.arange(width).view(1, -1) - width // 2
    centred = (y * y + x * x) <= radius * radius
    return torch.fft.ifftshift(centred, dim=(-2, -1))


def lowpass_mask(height: int, width: int, divisor: int, device: torch.device) -> torch.Tensor:
    """Boolean (H, W) mask of the low-frequency disc, in the unshifted FFT layout."""
    return _mask_cpu(height, width, divisor).to(device)


def rebuild_from_delta(cond: torch.Tensor, delta: torch.Tensor, w_low: float, w_high: float, divisor: int) -> torch.Tensor:
    """``c + IFFT(w_low*low(FFT(delta)) + w_high*high(FFT(delta))).real`` over the last two dims.

    Outputs without an (..., H, W) layout (fewer than 4 dims: packed token sequences) have no
    spatial spectrum; their whole difference is treated as low-frequency: ``c + w_low*delta``.
    """
    if w_low == w_high or cond.dim() < 4:
        return cond + delta * w_low if w_low != 1.0 else cond + delta
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    spectrum = torch.fft.fft2(delta.to(work), dim=(-2, -1))
    low = lowpass_mask(delta.shape[-2], delta.shape[-1], divisor, delta.device)
    weights = low.to(work) * (w_low - w_high) + w_high
    rebuilt = torch.fft.ifft2(spectrum * weights, dim=(-2, -1)).real
    return (cond.to(work) + rebuilt).to(cond.dtype)
