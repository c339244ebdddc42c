"""Which sampled clients fail or miss the deadline in a round: derived from (seed, round, client), so every
runtime and every resume agrees. Simulated client time is lognormal around ``client_time_s``."""

from __future__ import annotations

import math

import numpy as np

from cellm.federated.seeds import derive

FAILURE = 11


def arrivals(seed: int, round_: int, clients: list[int], failure_prob: float, deadline_s: float,
             client_time_s: float, time_sigma: float) -> tuple[list[int], list[int], list[int]]:
    """(arrived, failed, late) among ``clients``."""
    arrived, failed, late = [], [], []
    for c in clients:
        rng = np.random.default_rng(derive(seed, round_, c, FAILURE))
        u, z = rng.random(), rng.standard_normal()
        if u < failure_prob:
            failed.append(c)
        elif deadline_s > 0 and client_time_s * math.exp(time_sigma * z) > deadline_s:
            late.append(c)
        else:
            arrived.append(c)
    return arrived, failed, late
