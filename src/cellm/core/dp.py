"""Differential privacy of the aggregate (DP-FedAvg style, as in FLASC's reference).

Each client's sparse delta is clipped to L2 norm C; the server sums them, divides by C, adds N(0, z^2) to every
coordinate and divides by the number of clients. The privacy loss (epsilon for a given delta) comes from a
maintained accountant (opacus's RDP accountant), not from code written here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cellm.core.sparse import SparseVector


def clip(sv: SparseVector, clip_norm: float) -> SparseVector:
    """Scale the delta down to L2 norm <= clip_norm (unchanged when already within)."""
    norm = float(torch.linalg.vector_norm(sv.values.to(torch.float64)))
    if norm <= clip_norm or norm == 0.0:
        return sv
    return SparseVector(sv.n, sv.indices, (sv.values.to(torch.float64) * (clip_norm / norm)).to(torch.float32))


def private_mean(deltas: Sequence[SparseVector], clip_norm: float, noise_multiplier: float,
                 generator: torch.Generator) -> torch.Tensor:
    """(sum of clipped deltas / C + N(0, z^2 I)) / m: the noisy pseudo-gradient, in units of C."""
    if not deltas:
        raise ValueError("private_mean needs at least one delta")
    n = deltas[0].n
    total = torch.zeros(n, dtype=torch.float64)
    for d in deltas:
        c = clip(d, clip_norm)
        total.index_add_(0, c.indices, c.values.to(torch.float64))
    noise = torch.randn(n, generator=generator, dtype=torch.float64) * noise_multiplier
    return ((total / clip_norm + noise) / len(deltas)).to(torch.float32)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon after ``steps`` rounds at the given client sampling rate (RDP accountant, Poisson sampling)."""
    if steps <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta))
