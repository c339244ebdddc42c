"""The wire format of the seven SecAgg+ messages: strict, versioned, length-prefixed, never pickle.

Every message starts with the same 22-byte header::

    magic "CSAG" (4) | version u8 (=1) | kind u8 | params digest (16)

The digest names the round and its configuration (``SecAggParams.digest``): a message from another round, or
built with other parameters, is refused before its body is read. After the header, fields are big-endian
integers, fixed-size keys and ciphertexts, and lists preceded by their count (u32); the one variable-size blob
(the packed masked vector) is preceded by its length (u32). Parsers know the round's parameters, so every
count and length is checked against an exact bound before anything is allocated, ids must belong to the round
and appear in increasing order (one encoding per message), and trailing bytes are refused. Each error names
the message kind and the field.

Bodies (``id`` = u64 client id, ``pk`` = 32-byte X25519 public key, ``ct`` = 92 bytes: a 12-byte nonce and the
ChaCha20-Poly1305 ciphertext and tag of a 64-byte share pair, ``share`` = 32 bytes)::

    ADVERTISE       up    sender id | encryption pk | mask pk
    KEYS            down  recipient id | count | count x (id | encryption pk | mask pk)
    SHARES          up    sender id | seed commitment (32) | count | count x (recipient id | ct)
    ROUTED          down  recipient id | count | count x (sender id | ct)
    MASKED          up    sender id | values u32 | bits u8 | length u32 | packed ring values
    UNMASK_REQUEST  down  recipient id | count | count x survivor id | count | count x dropped id
    UNMASK          up    sender id | count | count x (owner id | what u8: 1 seed, 2 mask key | share)
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from cellm.core.secagg.crypto import KEY_BYTES, SHARE_CIPHERTEXT_BYTES
from cellm.core.secagg.errors import SecAggError
from cellm.core.secagg.params import DIGEST_BYTES, SecAggParams
from cellm.core.secagg.quantize import pack_ring, packed_size, unpack_ring

MAGIC = b"CSAG"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 2 + DIGEST_BYTES
ID_BYTES = 8
COUNT_BYTES = 4


class Kind(IntEnum):
    ADVERTISE = 1
    KEYS = 2
    SHARES = 3
    ROUTED = 4
    MASKED = 5
    UNMASK_REQUEST = 6
    UNMASK = 7
    CLIENT_STATE = 8


UP = "up"
DOWN = "down"
DIRECTION = {
    Kind.ADVERTISE: UP, Kind.KEYS: DOWN, Kind.SHARES: UP, Kind.ROUTED: DOWN,
    Kind.MASKED: UP, Kind.UNMASK_REQUEST: DOWN, Kind.UNMASK: UP,
}
"""Who sends each kind: "up" is client -> server, "down" server -> client (the ledger's directions)."""


class ShareKind(IntEnum):
    SEED = 1
    MASK_KEY = 2


# ---- the messages, parsed ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Advertise:
    sender: int
    enc_pk: bytes
    mask_pk: bytes


@dataclass(frozen=True)
class Keys:
    recipient: int
    peers: tuple[tuple[int, bytes, bytes], ...]  # (id, encryption pk, mask pk)


@dataclass(frozen=True)
class Shares:
    sender: int
    commitment: bytes
    ciphertexts: tuple[tuple[int, bytes], ...]  # (recipient id, ct)


@dataclass(frozen=True)
class Routed:
    recipient: int
    ciphertexts: tuple[tuple[int, bytes], ...]  # (sender id, ct)


@dataclass(frozen=True)
class Masked:
    sender: int
    values: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class Unmask:
    sender: int
    shares: tuple[tuple[int, ShareKind, bytes], ...]  # (owner id, what, share)


# ---- sizes: what each message costs on the wire ---------------------------------------------------------

_PEER_KEYS = ID_BYTES + 2 * KEY_BYTES
_ROUTED_CT = ID_BYTES + SHARE_CIPHERTEXT_BYTES
_UNMASK_SHARE = ID_BYTES + 1 + KEY_BYTES


def advertise_size() -> int:
    return HEADER_BYTES + ID_BYTES + 2 * KEY_BYTES


def keys_size(peers: int) -> int:
    return HEADER_BYTES + ID_BYTES + COUNT_BYTES + peers * _PEER_KEYS


def shares_size(peers: int) -> int:
    return HEADER_BYTES + ID_BYTES + KEY_BYTES + COUNT_BYTES + peers * _ROUTED_CT


def routed_size(peers: int) -> int:
    return HEADER_BYTES + ID_BYTES + COUNT_BYTES + peers * _ROUTED_CT


def masked_size(length: int, ring_bits: int) -> int:
    return HEADER_BYTES + ID_BYTES + 4 + 1 + 4 + packed_size(length, ring_bits)


def unmask_request_size(survivors: int, dropped: int) -> int:
    return HEADER_BYTES + ID_BYTES + 2 * COUNT_BYTES + (survivors + dropped) * ID_BYTES


def unmask_size(shares: int) -> int:
    return HEADER_BYTES + ID_BYTES + COUNT_BYTES + shares * _UNMASK_SHARE


# ---- writing ------------------------------------------------------------------------------------------------

def header(params: SecAggParams, kind: Kind) -> bytes:
    return MAGIC + bytes([VERSION, int(kind)]) + params.digest


def pack_id(i: int) -> bytes:
    return struct.pack(">Q", i)


def pack_count(n: int) -> bytes:
    return struct.pack(">I", n)


def encode_advertise(params: SecAggParams, m: Advertise) -> bytes:
    return header(params, Kind.ADVERTISE) + pack_id(m.sender) + m.enc_pk + m.mask_pk


def encode_keys(params: SecAggParams, m: Keys) -> bytes:
    body = b"".join(pack_id(i) + e + k for i, e, k in m.peers)
    return header(params, Kind.KEYS) + pack_id(m.recipient) + pack_count(len(m.peers)) + body


def encode_shares(params: SecAggParams, m: Shares) -> bytes:
    body = b"".join(pack_id(i) + ct for i, ct in m.ciphertexts)
    return header(params, Kind.SHARES) + pack_id(m.sender) + m.commitment + pack_count(len(m.ciphertexts)) + body


def encode_routed(params: SecAggParams, m: Routed) -> bytes:
    body = b"".join(pack_id(i) + ct for i, ct in m.ciphertexts)
    return header(params, Kind.ROUTED) + pack_id(m.recipient) + pack_count(len(m.ciphertexts)) + body


def encode_masked(params: SecAggParams, m: Masked) -> bytes:
    data = pack_ring(m.values, params.ring_bits)
    return (header(params, Kind.MASKED) + pack_id(m.sender) + struct.pack(">IBI", params.length, params.ring_bits,
                                                                         len(data)) + data)


def encode_unmask_request(params: SecAggParams, m: UnmaskRequest) -> bytes:
    return (header(params, Kind.UNMASK_REQUEST) + pack_id(m.recipient)
            + pack_count(len(m.survivors)) + b"".join(map(pack_id, m.survivors))
            + pack_count(len(m.dropped)) + b"".join(map(pack_id, m.dropped)))


def encode_unmask(params: SecAggParams, m: Unmask) -> bytes:
    body = b"".join(pack_id(o) + bytes([int(w)]) + s for o, w, s in m.shares)
    return header(params, Kind.UNMASK) + pack_id(m.sender) + pack_count(len(m.shares)) + body


# ---- reading ------------------------------------------------------------------------------------------------

class Reader:
    """A cursor over one message that refuses to read past its end and names the field that was short."""

    def __init__(self, buf: bytes, what: str) -> None:
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise SecAggError(f"{what}: expected bytes, got {type(buf).__name__}")
        self.buf = bytes(buf)
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        left = len(self.buf) - self.pos
        if n > left:
            raise SecAggError(f"{self.what}: truncated in {field} (needs {n} bytes, {left} left)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u32(self, field: str) -> int:
        return struct.unpack(">I", self.take(4, field))[0]

    def u64(self, field: str) -> int:
        return struct.unpack(">Q", self.take(8, field))[0]

    def count(self, field: str, most: int, record_bytes: int) -> int:
        """A list's count, bounded by ``most`` and by the bytes actually left (checked before any allocation)."""
        n = self.u32(field)
        if n > most:
            raise SecAggError(f"{self.what}: {field} is {n}, more than the {most} this round allows")
        left = len(self.buf) - self.pos
        if n * record_bytes > left:
            raise SecAggError(f"{self.what}: truncated: {field} says {n} entries of {record_bytes} bytes, "
                              f"{left} bytes left")
        return n

    def member(self, params: SecAggParams, field: str, allowed: frozenset[int] | None = None) -> int:
        i = self.u64(field)
        if i not in (allowed if allowed is not None else params.id_set):
            raise SecAggError(f"{self.what}: {field} {i} is not a client this message may name")
        return i

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise SecAggError(f"{self.what}: {len(self.buf) - self.pos} unexpected bytes after the last field")


def peek_kind(buf: bytes) -> Kind:
    """A message's kind from its header alone (for byte accounting); SecAggError if the header is not ours."""
    if len(buf) < HEADER_BYTES:
        raise SecAggError(f"secagg message: {len(buf)} bytes, shorter than the {HEADER_BYTES}-byte header")
    if buf[:4] != MAGIC:
        raise SecAggError("secagg message: bad magic (not a secure-aggregation message)")
    if buf[4] != VERSION:
        raise SecAggError(f"secagg message: version {buf[4]}, this build reads version {VERSION}")
    try:
        return Kind(buf[5])
    except ValueError:
        raise SecAggError(f"secagg message: unknown kind {buf[5]}") from None


def open_message(params: SecAggParams, buf: bytes, kind: Kind) -> Reader:
    what = f"{kind.name} message"
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise SecAggError(f"{what}: expected bytes, got {type(buf).__name__}")
    got = peek_kind(bytes(buf))
    if got != kind:
        raise SecAggError(f"{what}: got a {got.name} message instead")
    r = Reader(buf, what)
    r.take(6, "header")
    if r.take(DIGEST_BYTES, "params digest") != params.digest:
        raise SecAggError(f"{what}: params digest does not match: built for another round or configuration")
    return r


def _increasing(ids: list[int], what: str, field: str) -> None:
    if any(a >= b for a, b in zip(ids, ids[1:], strict=False)):
        raise SecAggError(f"{what}: {field} ids must be strictly increasing (no repeats)")


def parse_advertise(params: SecAggParams, buf: bytes) -> Advertise:
    r = open_message(params, buf, Kind.ADVERTISE)
    m = Advertise(r.member(params, "sender"), r.take(KEY_BYTES, "encryption key"), r.take(KEY_BYTES, "mask key"))
    r.done()
    return m


def parse_keys(params: SecAggParams, buf: bytes) -> Keys:
    r = open_message(params, buf, Kind.KEYS)
    recipient = r.member(params, "recipient")
    n = r.count("peer count", params.degree, _PEER_KEYS)
    peers = tuple((r.member(params, "peer"), r.take(KEY_BYTES, "peer encryption key"),
                   r.take(KEY_BYTES, "peer mask key")) for _ in range(n))
    r.done()
    _increasing([p[0] for p in peers], r.what, "peer")
    return Keys(recipient, peers)


def parse_shares(params: SecAggParams, buf: bytes) -> Shares:
    r = open_message(params, buf, Kind.SHARES)
    sender = r.member(params, "sender")
    commitment = r.take(KEY_BYTES, "seed commitment")
    n = r.count("ciphertext count", params.degree, _ROUTED_CT)
    cts = tuple((r.member(params, "recipient"), r.take(SHARE_CIPHERTEXT_BYTES, "ciphertext")) for _ in range(n))
    r.done()
    _increasing([c[0] for c in cts], r.what, "recipient")
    return Shares(sender, commitment, cts)


def parse_routed(params: SecAggParams, buf: bytes) -> Routed:
    r = open_message(params, buf, Kind.ROUTED)
    recipient = r.member(params, "recipient")
    n = r.count("ciphertext count", params.degree, _ROUTED_CT)
    cts = tuple((r.member(params, "sender"), r.take(SHARE_CIPHERTEXT_BYTES, "ciphertext")) for _ in range(n))
    r.done()
    _increasing([c[0] for c in cts], r.what, "sender")
    return Routed(recipient, cts)


def parse_masked(params: SecAggParams, buf: bytes) -> Masked:
    r = open_message(params, buf, Kind.MASKED)
    sender = r.member(params, "sender")
    count, bits, nbytes = r.u32("value count"), r.u8("ring bits"), r.u32("data length")
    if count != params.length:
        raise SecAggError(f"{r.what}: value count {count}, the round's vectors have {params.length}")
    if bits != params.ring_bits:
        raise SecAggError(f"{r.what}: ring bits {bits}, the round uses {params.ring_bits}")
    if nbytes != packed_size(count, bits):
        raise SecAggError(f"{r.what}: data length {nbytes}, expected {packed_size(count, bits)}")
    values = unpack_ring(r.take(nbytes, "packed values"), count, bits, f"{r.what}: packed values")
    r.done()
    return Masked(sender, values)


def parse_unmask_request(params: SecAggParams, buf: bytes) -> UnmaskRequest:
    r = open_message(params, buf, Kind.UNMASK_REQUEST)
    recipient = r.member(params, "recipient")
    lists = []
    for field in ("survivor", "dropped"):
        n = r.count(f"{field} count", params.degree, ID_BYTES)
        ids = [r.member(params, field) for _ in range(n)]
        _increasing(ids, r.what, field)
        lists.append(tuple(ids))
    r.done()
    return UnmaskRequest(recipient, lists[0], lists[1])


def parse_unmask(params: SecAggParams, buf: bytes) -> Unmask:
    r = open_message(params, buf, Kind.UNMASK)
    sender = r.member(params, "sender")
    n = r.count("share count", params.degree + 1, _UNMASK_SHARE)
    shares = []
    for _ in range(n):
        owner, what = r.member(params, "owner"), r.u8("share kind")
        if what not in (ShareKind.SEED, ShareKind.MASK_KEY):
            raise SecAggError(f"{r.what}: share kind {what} is neither 1 (seed) nor 2 (mask key)")
        shares.append((owner, ShareKind(what), r.take(KEY_BYTES, "share")))
    r.done()
    _increasing([s[0] for s in shares], r.what, "owner")
    return Unmask(sender, tuple(shares))


# ---- byte accounting ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MessageSize:
    """One message on the wire: its kind, direction ("up" client -> server, "down" server -> client), peer, bytes."""

    kind: str
    direction: str
    client: int
    nbytes: int


def message_sizes(messages: Mapping[int, bytes]) -> list[MessageSize]:
    """The size of every message in one stage's batch (client id -> message), read from its own header.

    The runtime passes each batch it sends or receives and records the rows in its ledger (``direction``
    matches the ledger's "up" / "down").
    """
    out = []
    for client, buf in messages.items():
        kind = peek_kind(buf)
        if kind not in DIRECTION:
            raise SecAggError(f"secagg message: a {kind.name} blob is not a message that travels")
        out.append(MessageSize(kind.name.lower(), DIRECTION[kind], int(client), len(buf)))
    return out


def expected_traffic(params: SecAggParams) -> dict[str, dict[str, int]]:
    """Bytes each stage sends per direction in a round where no client drops: for planning and reports.

    With dropouts every later stage is smaller; count the real messages with ``message_sizes``.
    """
    n, k = len(params.client_ids), params.degree
    return {
        "advertise": {UP: n * advertise_size(), DOWN: 0},
        "keys": {UP: 0, DOWN: n * keys_size(k)},
        "shares": {UP: n * shares_size(k), DOWN: 0},
        "routed": {UP: 0, DOWN: n * routed_size(k)},
        "masked": {UP: n * masked_size(params.length, params.ring_bits), DOWN: 0},
        "unmask_request": {UP: 0, DOWN: n * unmask_request_size(k, 0)},
        "unmask": {UP: n * unmask_size(k + 1), DOWN: 0},
    }
