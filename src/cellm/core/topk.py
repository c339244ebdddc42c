"""Global top-k by magnitude over one flat vector (FLASC's mask), with deterministic tie-breaking.

With ``block`` = b > 1 the top-k keeps whole blocks of b consecutive entries (block j = entries [j*b, (j+1)*b),
the last one shorter when b does not divide N), ranked by their squared L2 norm: a message then names blocks,
not entries, and its positions cost about 1/b of the per-entry code.
"""

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


def max_kept_entries(n: int, density: float, block: int = 1) -> int:
    """The most entries a top-k at ``density`` keeps: num_kept(N, d), or num_kept(ceil(N / b), d) whole blocks of
    b entries (at most N). What a receiver bounds a message's k by."""
    if block == 1:
        return num_kept(n, density)
    return min(n, num_kept(num_blocks(n, block), density) * block)


def num_blocks(n: int, block: int) -> int:
    """ceil(N / b): the blocks of the grid over a vector of N entries."""
    _check_block(block)
    return -(-n // block)


def block_norms(x: torch.Tensor, block: int) -> torch.Tensor:
    """Squared L2 norm of each block of the grid (float64, so that ranking barely depends on summation order)."""
    x = x.detach().reshape(-1).to(torch.float64)
    nb = num_blocks(x.numel(), block)
    sq = torch.zeros(nb * block, dtype=torch.float64)
    sq[: x.numel()] = x.square()
    return sq.view(nb, block).sum(dim=1)


def block_topk_indices(x: torch.Tensor, kept_blocks: int, block: int) -> torch.Tensor:
    """Sorted positions of every entry of the ``kept_blocks`` blocks of largest L2 norm; ties go to the lower
    block (a stable sort, as :func:`topk_indices`)."""
    x = x.reshape(-1)
    n = x.numel()
    nb = num_blocks(n, block)
    if kept_blocks >= nb:
        return torch.arange(n, dtype=torch.int64)
    if kept_blocks <= 0:
        return torch.empty(0, dtype=torch.int64)
    order = torch.argsort(-block_norms(x, block), stable=True)
    return expand_blocks(torch.sort(order[:kept_blocks]).values, n, block)


def expand_blocks(blocks: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """The entries of the sorted block indices ``blocks``, in order (the last block cut at N)."""
    idx = (blocks.to(torch.int64).reshape(-1, 1) * block + torch.arange(block, dtype=torch.int64)).reshape(-1)
    return idx[idx < n] if blocks.numel() and int(blocks[-1]) == num_blocks(n, block) - 1 else idx


def whole_blocks(indices: torch.Tensor, n: int, block: int) -> bool:
    """Whether the sorted, distinct positions ``indices`` (all < N) are a union of whole blocks of the grid."""
    _check_block(block)
    if block == 1 or indices.numel() == 0:
        return True
    idx = indices.reshape(-1).to(torch.int64)
    bid = torch.div(idx, block, rounding_mode="floor")
    ids, counts = torch.unique_consecutive(bid, return_counts=True)
    return bool(torch.equal(counts, torch.clamp(n - ids * block, max=block)))


def topk_mask(x: torch.Tensor, density: float, block: int = 1) -> torch.Tensor:
    """Boolean mask M with exactly floor(N * d) True entries at the largest |x| (one top-k over all tensors).

    ``block`` = b > 1: the num_kept(ceil(N / b), d) blocks of largest L2 norm, every entry of each.
    """
    x = x.reshape(-1)
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[_topk(x, density, block)] = True
    return mask


def sparsify(x: torch.Tensor, density: float, block: int = 1) -> SparseVector:
    """The top-k part of x as a SparseVector (whole blocks of ``block`` entries); d = 1 gives the dense vector."""
    x = x.detach().reshape(-1).to(torch.float32)
    if density >= 1.0:
        return SparseVector.from_dense(x)
    idx = _topk(x, density, block)
    return SparseVector(x.numel(), idx, x[idx].clone())


def _topk(x: torch.Tensor, density: float, block: int) -> torch.Tensor:
    if block == 1:
        return topk_indices(x, num_kept(x.numel(), density))
    nb = num_blocks(x.numel(), block)
    return block_topk_indices(x, num_kept(nb, density), block)


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
