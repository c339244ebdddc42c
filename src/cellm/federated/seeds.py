"""Randomness derived from (seed, round, client): the same run, bit for bit, whatever the runtime or order."""

from __future__ import annotations

import numpy as np

SAMPLING, BATCHES, DROPOUT, DP_NOISE = 1, 2, 3, 4
UP_SUPPORT = 20  # the seeded random part of a shared upload support (comm.up_support)
SECAGG_ROUNDING = 21  # a client's stochastic rounding of its values into the secure-aggregation ring


def derive(seed: int, round_: int, client: int, stream: int) -> int:
    """A 63-bit seed unique to (seed, round, client, stream)."""
    ss = np.random.SeedSequence([seed, round_, client + 1, stream])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def support_seed(seed: int, round_: int) -> int:
    """The seed of ``round_``'s random upload support: one for the whole round (client -1), so every client and
    the server derive the same set."""
    return derive(seed, round_, -1, UP_SUPPORT)


def sample_clients(seed: int, round_: int, num_clients: int, per_round: int,
                   available: list[int] | None = None) -> list[int]:
    """``per_round`` distinct clients, uniformly at random, sorted. With ``available`` (the clients a runtime can
    reach this round, when not all), as many as it can of those; with all available, the same draw as without."""
    rng = np.random.default_rng(derive(seed, round_, -1, SAMPLING))
    if available is None or len(set(available)) == num_clients:
        return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))
    pool = np.array(sorted(set(available)), dtype=np.int64)
    return sorted(int(c) for c in rng.choice(pool, size=min(per_round, len(pool)), replace=False))
