"""Global top-k by magnitude over one flat vector (FLASC's mask), with deterministic tie-breaking."""

from __future__ import annotations

import math

import torch

from cellm.core.sparse import SparseVector


def num_kept(n: int, density: float) -> int:
    """k = floor(N * d), at least 1 when N > 0 (a message never carries nothing by accident)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density == 1.0:
        return n
    return max(1, min(n, math.floor(n * density))) if n > 0 else 0


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions of the k entries of largest |x|; ties go to the lower position.

    A stable sort on -|x| makes ties deterministic (torch.topk does not promise an order among equal values).
    """
    x = x.reshape(-1)
    n = x.numel()
    if k >= n:
        return torch.arange(n, dtype=torch.int64)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    mag = x.detach().abs().to(torch.float32)
    order = torch.argsort(-mag, stable=True)
    idx = order[:k]
    return torch.sort(idx).values.to(torch.int64)


def topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask M with exactly floor(N * d) True entries at the largest |x| (one top-k over all tensors)."""
    x = x.reshape(-1)
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[topk_indices(x, num_kept(x.numel(), density))] = True
    return mask


def sparsify(x: torch.Tensor, density: float) -> SparseVector:
    """The top-k part of x as a SparseVector; d = 1 gives the dense vector."""
    x = x.detach().reshape(-1).to(torch.float32)
    if density >= 1.0:
        return SparseVector.from_dense(x)
    idx = topk_indices(x, num_kept(x.numel(), density))
    return SparseVector(x.numel(), idx, x[idx].clone())
