"""FiniteFlag (Note [finiteness by sum]): the flag says "all finite" exactly when every element
of every tensor is finite, against ``torch.isfinite`` as the reference."""

from __future__ import annotations

import math

import pytest
import torch

from mixcache_compile.runtime.host_flags import FiniteFlag


def _reference(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("poison", [None, math.nan, math.inf, -math.inf, "both"])
@pytest.mark.parametrize("where", [0, 1])
def test_flag_matches_isfinite(dtype: torch.dtype, poison: object, where: int) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, 3, 17, generator=g).to(dtype) * 100, torch.randn(5, generator=g).to(dtype)]
    if poison == "both":  # +inf and -inf in one tensor: their sum is NaN, still not finite
        tensors[where].view(-1)[0], tensors[where].view(-1)[-1] = math.inf, -math.inf
    elif poison is not None:
        tensors[where].view(-1)[3] = poison
    assert FiniteFlag(tensors).all_finite() == _reference(tensors)


def test_large_finite_half_values_do_not_overflow() -> None:
    # float16 tops out at 65504: 4096 elements of 60000 sum to 2.5e8, fine in float32
    t = torch.full((4096,), 60000.0, dtype=torch.float16)
    assert FiniteFlag([t]).all_finite()


def test_overflowing_sum_reads_as_non_finite() -> None:
    # the documented safe side: finite values whose float32 sum overflows refuse the reuse
    t = torch.full((4,), 3e38, dtype=torch.float32)
    assert _reference([t]) and not FiniteFlag([t]).all_finite()


def test_flag_of_a_tensor_requiring_grad_keeps_no_graph() -> None:
    w = torch.ones(3, requires_grad=True)
    flag = FiniteFlag([w * 2])
    assert flag.all_finite() and not flag._host.requires_grad
