"""Density schedules: d(t) = d0 * decay ** ((t - 1) // every) for rounds t = 1, 2, ..."""

from __future__ import annotations


def density_at(d0: float, decay: float, every: int, round_: int) -> float:
    """Density used in round ``round_`` (1-based). Round 0 (the initial evaluation) uses round 1's density."""
    if every < 1:
        raise ValueError(f"decay period must be >= 1, got {every}")
    steps = max(0, round_ - 1) // every
    return float(d0 * decay**steps)
