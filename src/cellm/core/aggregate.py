"""Combining the clients' decoded sparse deltas into one pseudo-gradient."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cellm.core.sparse import SparseVector


def aggregate(deltas: Sequence[SparseVector], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean of sparse deltas as a dense vector.

    ``weights=None`` is FLASC's plain mean: the sum divided by the number of clients, so entries a client did not
    send count as zeros. Example-count weights give the FedAvg-style weighted mean.
    """
    if not deltas:
        raise ValueError("aggregate needs at least one delta")
    n = deltas[0].n
    if any(d.n != n for d in deltas):
        raise ValueError("all deltas must have the same length N")
    w = [1.0] * len(deltas) if weights is None else [float(x) for x in weights]
    if len(w) != len(deltas) or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError("weights must be non-negative, one per delta, with a positive sum")
    total = sum(w)
    out = torch.zeros(n, dtype=torch.float64)
    for d, wi in zip(deltas, w, strict=True):
        out.index_add_(0, d.indices, d.values.to(torch.float64) * (wi / total))
    return out.to(torch.float32)
