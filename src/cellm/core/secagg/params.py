"""A round's public parameters, the SecAgg+ neighbour graph, and the digest that binds every message to them."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property

from cellm.core.secagg.crypto import DOMAIN, u64
from cellm.core.secagg.quantize import MAX_CLIENTS, QuantSpec

SESSION_BYTES = 16
DIGEST_BYTES = 16
MAX_LENGTH = (1 << 32) - 1
"""Most values one vector may have (the wire format counts them in 32 bits)."""


@dataclass(frozen=True)
class SecAggParams:
    """Everything the server and every client of one round must agree on; both sides build it from the config.

    Nothing here is secret. ``session`` must differ between rounds (e.g. a hash of the run seed and the round):
    it salts every derived key and seeds the neighbour graph, so no message or key carries over to another
    round.
    """

    session: bytes
    """16 bytes, unique to the round."""
    client_ids: tuple[int, ...]
    """The round's sampled clients (node ids < 2^64); stored sorted."""
    length: int
    """|S|: values per client vector, the shared support's size."""
    quant: QuantSpec
    neighbours: int = 0
    """SecAgg+ degree k: each client masks with, and shares its secrets among, k others (rounded up to even).
    0 (or k >= clients - 1) means everyone: plain SecAgg, the most robust to dropouts, O(n^2) masks."""
    threshold: int = 0
    """Shamir threshold t among a neighbourhood of k + 1 (the client included); 0 means a majority."""

    def __post_init__(self) -> None:
        if not isinstance(self.session, bytes) or len(self.session) != SESSION_BYTES:
            raise ValueError(f"SecAggParams.session must be {SESSION_BYTES} bytes")
        ids = tuple(self.client_ids)
        if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < 1 << 64 for i in ids):
            raise ValueError("SecAggParams.client_ids must be integers in [0, 2^64)")
        if len(set(ids)) != len(ids):
            raise ValueError("SecAggParams.client_ids has duplicates")
        if not 2 <= len(ids) <= min(self.quant.max_clients, MAX_CLIENTS):
            raise ValueError(
                f"SecAggParams: {len(ids)} clients; secure aggregation needs at least 2 and at most "
                f"quant.max_clients = {self.quant.max_clients}"
            )
        object.__setattr__(self, "client_ids", tuple(sorted(ids)))
        if not (isinstance(self.length, int) and 1 <= self.length <= MAX_LENGTH):
            raise ValueError(f"SecAggParams.length must be in [1, {MAX_LENGTH}], got {self.length!r}")
        if not (isinstance(self.neighbours, int) and self.neighbours >= 0):
            raise ValueError(f"SecAggParams.neighbours must be >= 0, got {self.neighbours!r}")
        if not (isinstance(self.threshold, int) and self.threshold >= 0):
            raise ValueError(f"SecAggParams.threshold must be >= 0, got {self.threshold!r}")
        if self.threshold and not 2 <= self.threshold <= self.degree + 1:
            raise ValueError(
                f"SecAggParams.threshold {self.threshold} must be in [2, {self.degree + 1}] (a neighbourhood of "
                f"{self.degree} neighbours plus the client itself)"
            )

    @cached_property
    def id_set(self) -> frozenset[int]:
        return frozenset(self.client_ids)

    @property
    def ring_bits(self) -> int:
        return self.quant.ring_bits

    @cached_property
    def degree(self) -> int:
        """Neighbours per client: k rounded up to even, or everyone else."""
        n = len(self.client_ids)
        half = (self.neighbours + 1) // 2
        if self.neighbours == 0 or 2 * half >= n - 1:
            return n - 1
        return 2 * half

    @cached_property
    def t(self) -> int:
        """The effective Shamir threshold."""
        return self.threshold or (self.degree + 1) // 2 + 1

    @cached_property
    def graph(self) -> dict[int, frozenset[int]]:
        """Each client's neighbours: a ring (Harary) graph over a permutation seeded by ``session``.

        As in SecAgg+ (Bell et al. 2020): each client is linked to the k/2 clients on either side of it in a
        random order. The order is a hash of the session and the id, so every party derives the same graph and
        none chooses its neighbours.
        """
        ids = self.client_ids
        n = len(ids)
        if self.degree == n - 1:
            return {i: frozenset(j for j in ids if j != i) for i in ids}
        order = sorted(ids, key=lambda i: hashlib.sha256(DOMAIN + b"graph" + self.session + u64(i)).digest())
        half = self.degree // 2
        return {
            cid: frozenset(order[(pos + off) % n] for off in range(-half, half + 1) if off)
            for pos, cid in enumerate(order)
        }

    def holders(self, owner: int) -> tuple[int, ...]:
        """Who holds shares of ``owner``'s secrets, sorted: its neighbours and itself (share index = position + 1)."""
        return tuple(sorted(self.graph[owner] | {owner}))

    def share_index(self, owner: int, holder: int) -> int:
        """The Shamir index (from 1) of ``holder``'s share of ``owner``'s secrets."""
        return self.holders(owner).index(holder) + 1

    @cached_property
    def digest(self) -> bytes:
        """16 bytes that name this round and configuration; every message carries it and every key is salted by it."""
        q = self.quant
        fields = struct.pack(
            ">IdBIBII", self.length, float(q.clip), q.value_bits, q.max_clients, q.margin_bits, self.degree, self.t
        )
        body = DOMAIN + b"params" + self.session + fields + u64(len(self.client_ids))
        body += b"".join(u64(i) for i in self.client_ids)
        return hashlib.sha256(body).digest()[:DIGEST_BYTES]
