"""Secure aggregation in the round (``secagg.enabled``): the server learns the sum of the round's uploads over a
shared support, never a single upload.

The protocol is :mod:`cellm.core.secagg` (SecAgg+); this module holds what the round adds to it: the round's
public parameters (both sides build them from the config, the round and its sampled clients), a client's values
quantized into the ring with a seeded rounding (so a run is the same whatever the runtime), the protocol's bytes
in the ledger, and the server's step from the unmasked sum. The runtimes carry the messages
(:func:`cellm.runtime.driver.play_round`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from cellm.config import CellmConfig
from cellm.core.ledger import Ledger
from cellm.core.secagg import QuantSpec, SecAggError, SecAggParams, dequantize, message_sizes, quantize
from cellm.core.secagg.wire import parse_masked
from cellm.federated.seeds import SECAGG_ROUNDING, derive

PART = "secagg"  # the ledger's name for the protocol's own bytes (keys, shares, unmasking)


def quant_spec(cfg: CellmConfig) -> QuantSpec:
    """The ring every client of a run quantizes into: ``secagg.clip``, ``secagg.value_bits``, and headroom for
    the round's clients (``fl.clients_per_round``), no more."""
    s = cfg.secagg
    return QuantSpec(clip=s.clip, value_bits=s.value_bits, max_clients=max(cfg.fl.clients_per_round, 2))


def round_params(cfg: CellmConfig, round_: int, clients: list[int], length: int) -> SecAggParams:
    """The round's public parameters: a session unique to (seed, round), the sampled clients, |S|."""
    session = hashlib.sha256(f"cellm-secagg/{cfg.seed}/{round_}".encode()).digest()[:16]
    return SecAggParams(session=session, client_ids=tuple(clients), length=length, quant=quant_spec(cfg),
                        neighbours=cfg.secagg.neighbours, threshold=cfg.secagg.threshold)


def ring_values(values: torch.Tensor, quant: QuantSpec, seed: int, round_: int,
                client: int) -> tuple[np.ndarray, torch.Tensor]:
    """A client's values on the support, clipped and stochastically rounded into the ring (seeded by
    (seed, round, client)); returns (ring vector, what it stands for as floats: error feedback keeps the rest)."""
    rng = np.random.default_rng(derive(seed, round_, client, SECAGG_ROUNDING))
    q = quantize(values.detach().to(torch.float64).numpy(), quant, rng)
    return q, torch.from_numpy(dequantize(q, quant)).to(torch.float32)


def record(ledger: Ledger, round_: int, batch: Mapping[int, bytes]) -> None:
    """Count one stage's messages (each client's, in its direction) as the protocol's bytes."""
    for m in message_sizes(batch):
        ledger.record(round_, m.direction, m.nbytes, 0, part=PART)


def check_masked(params: SecAggParams, client: int, payload: bytes) -> None:
    """One client's masked upload, checked on its own before it joins the round's sum (SecAggError if it is not
    a well-formed masked vector of this round from that client): a bad one is refused, the others go on."""
    m = parse_masked(params, payload)
    if m.sender != client:
        raise SecAggError(f"masked upload from client {client} names client {m.sender} as its sender")
