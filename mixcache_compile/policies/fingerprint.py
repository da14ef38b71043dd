"""A short fingerprint of a model's weights: which shipped calibration belongs to it.

Note [weights fingerprint]: a calibration is made on one set of weights; the same class with
other weights (another shipped model, a fine-tune) needs its own. The fingerprint hashes the
class name, every parameter's name, shape and dtype, and a strided sample of at most 256 of
its values (so it costs microseconds even on a large model, and any retrained model differs).
A compiled wrapper (``torch.compile``'s ``OptimizedModule``) is looked through. An exported
transformer holds no parameters of its own (its weights live in the export's files), so export
records the fingerprint of the model it traced and the loaded transformer answers it as
``weights_fingerprint``: an export of a shipped model runs that model's calibration, as
``enable`` on the model itself does.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

SAMPLE = 256


def fingerprint(model: Any) -> str:
    recorded = getattr(model, "weights_fingerprint", None)
    if isinstance(recorded, str):
        return recorded
    module = getattr(model, "_orig_mod", model)
    if not isinstance(module, torch.nn.Module):
        return ""
    digest = hashlib.sha256(type(module).__name__.encode())
    with torch.no_grad():
        for name, p in module.named_parameters():
            flat = p.detach().reshape(-1)
            stride = max(1, flat.numel() // SAMPLE)
            sample = flat[::stride][:SAMPLE].to("cpu", torch.float64)
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
