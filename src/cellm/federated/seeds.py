"""Randomness derived from (seed, round, client): the same run, bit for bit, whatever the runtime or order."""

from __future__ import annotations

import numpy as np

SAMPLING, BATCHES, DROPOUT, DP_NOISE = 1, 2, 3, 4


def derive(seed: int, round_: int, client: int, stream: int) -> int:
    """A 63-bit seed unique to (seed, round, client, stream)."""
    ss = np.random.SeedSequence([seed, round_, client + 1, stream])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def sample_clients(seed: int, round_: int, num_clients: int, per_round: int) -> list[int]:
    """``per_round`` distinct clients, uniformly at random, sorted."""
    rng = np.random.default_rng(derive(seed, round_, -1, SAMPLING))
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))
