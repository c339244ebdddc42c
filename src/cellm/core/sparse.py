"""The sparse vector that travels in every message: N, the kept positions and their values."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseVector:
    """k of N entries of a flat float vector.

    ``indices`` is int64, strictly increasing, every entry in [0, n); ``values`` is float32 of the same length.
    A dense vector is the case k == n with ``indices == arange(n)``.
    """

    n: int
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    @property
    def is_dense(self) -> bool:
        return self.k == self.n

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.n, dtype=torch.float32)
        out[self.indices] = self.values.to(torch.float32)
        return out

    @staticmethod
    def from_dense(x: torch.Tensor) -> SparseVector:
        """All N entries, zeros included (the d = 1 message)."""
        x = x.detach().reshape(-1).to(torch.float32)
        return SparseVector(x.numel(), torch.arange(x.numel(), dtype=torch.int64), x.clone())

    @staticmethod
    def from_mask(x: torch.Tensor, mask: torch.Tensor) -> SparseVector:
        x = x.detach().reshape(-1).to(torch.float32)
        idx = torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1).to(torch.int64)
        return SparseVector(x.numel(), idx, x[idx].clone())
