"""Simulated faults, derived from (seed, round, client) so every runtime and every resume agrees: which sampled
clients fail or miss the deadline (simulated client time is lognormal around ``client_time_s``), and which ones
attack, with what upload (to measure how robust a configuration is)."""

from __future__ import annotations

import math

import numpy as np
import torch

from cellm.core.sparse import SparseVector
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


ATTACKER, ATTACK_NOISE = 12, 13
ATTACKS = ("scale", "signflip", "random")


def attackers(seed: int, round_: int, clients: list[int], fraction: float) -> list[int]:
    """The sampled clients that attack this round: round(fraction * m) of them (at least one when fraction > 0),
    drawn from (seed, round), so every runtime and every resume agrees."""
    if fraction <= 0 or not clients:
        return []
    count = min(len(clients), max(1, round(fraction * len(clients))))
    rng = np.random.default_rng(derive(seed, round_, -1, ATTACKER))
    return sorted(int(c) for c in rng.choice(np.array(sorted(clients)), size=count, replace=False))


def attack(sv: SparseVector, kind: str, scale: float, generator: torch.Generator) -> SparseVector:
    """A Byzantine client's upload made from its honest one (same positions, so it passes every position check):
    ``scale``: the honest values times ``scale``; ``signflip``: times ``-scale``; ``random``: Gaussian noise whose
    norm is ``scale`` times the honest norm (1 when the honest upload is all zeros)."""
    v = sv.values.to(torch.float64)
    if kind == "scale":
        out = v * scale
    elif kind == "signflip":
        out = -v * scale
    elif kind == "random":
        noise = torch.randn(v.shape, generator=generator, dtype=torch.float64)
        honest = float(torch.linalg.vector_norm(v)) or 1.0
        out = noise * (scale * honest / max(float(torch.linalg.vector_norm(noise)), 1e-300))
    else:
        raise ValueError(f"unknown attack {kind!r}; one of {', '.join(ATTACKS)}")
    return SparseVector(sv.n, sv.indices, out.to(torch.float32))
