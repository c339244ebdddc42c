"""SecAgg+ for one round: client-side and server-side steps as functions over explicit, immutable states.

Sets of clients as the server sees them (Bonawitz et al. 2017 name them U1..U4):
U1 advertised keys, U2 sent their encrypted shares, U3 sent a masked vector, U4 answered the unmask request.
Each client i masks with its neighbours in U2 (the senders of the ciphertexts routed to it):
``y_i = x_i + PRG(b_i) + sum_{j in N(i) & U2} sign(i, j) PRG(s_ij)  (mod 2^R)``, ``sign = +1 if i < j else -1``.
Pairwise masks between members of U3 cancel in the sum; the server removes the self-masks of U3 (their seeds
rebuilt from shares) and the masks that U3 members applied with the clients of U2 \\ U3 (their mask keys
rebuilt from shares). Every function validates what it receives (see ``wire``) and against the state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from cellm.core.secagg import crypto
from cellm.core.secagg.crypto import KEY_BYTES, Entropy, u64
from cellm.core.secagg.errors import SecAggAbort, SecAggError
from cellm.core.secagg.params import SecAggParams
from cellm.core.secagg.quantize import dequantize_sum, ring_mask
from cellm.core.secagg.wire import (
    Advertise,
    Keys,
    Kind,
    Masked,
    Reader,
    Routed,
    ShareKind,
    Shares,
    Unmask,
    UnmaskRequest,
    encode_advertise,
    encode_keys,
    encode_masked,
    encode_routed,
    encode_shares,
    encode_unmask,
    encode_unmask_request,
    header,
    open_message,
    pack_count,
    pack_id,
    parse_advertise,
    parse_keys,
    parse_masked,
    parse_routed,
    parse_shares,
    parse_unmask,
    parse_unmask_request,
)

# ---- key derivations shared by both sides (domain-separated, salted by the round's digest) --------------


def _enc_key(params: SecAggParams, own_sk, peer_pk: bytes, src: int, dst: int) -> bytes:
    """The one-message key for shares sent from src to dst (directional, so each key encrypts once)."""
    return crypto.derive_key(own_sk, peer_pk, params.digest, b"enc" + u64(src) + u64(dst),
                             f"share encryption key {src}->{dst}")


def _share_ad(params: SecAggParams, src: int, dst: int) -> bytes:
    """Associated data: the ciphertext opens only as src's shares for dst in this round."""
    return crypto.DOMAIN + b"share" + params.digest + u64(src) + u64(dst)


def _pair_mask(params: SecAggParams, own_sk, peer_pk: bytes, a: int, b: int) -> np.ndarray:
    lo, hi = min(a, b), max(a, b)
    key = crypto.derive_key(own_sk, peer_pk, params.digest, b"mask" + u64(lo) + u64(hi), f"mask key {lo}-{hi}")
    return crypto.prg(key, params.length, params.ring_bits)


def _self_mask(params: SecAggParams, seed: bytes, owner: int) -> np.ndarray:
    return crypto.prg(crypto.hkdf(seed, params.digest, b"self" + u64(owner)), params.length, params.ring_bits)


def _need(params: SecAggParams, who: int, live_neighbours: int, stage: str) -> None:
    """A neighbourhood with fewer than t live members (the client included) cannot finish securely."""
    if live_neighbours + 1 < params.t:
        raise SecAggAbort(
            f"{stage}: client {who} has {live_neighbours} live neighbours; with itself that is fewer than the "
            f"threshold {params.t}, so the round cannot be aggregated securely"
        )


def _check_sender(msg_sender: int, node: int, what: str) -> None:
    if msg_sender != node:
        raise SecAggError(f"{what}: sender field says {msg_sender} but the message came from client {node}")


# ---- client states ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientAdvertised:
    """After stage 1: the client's two key pairs and its self-mask seed b_i (all secret)."""

    params: SecAggParams
    client_id: int
    enc_sk: bytes = field(repr=False)
    mask_sk: bytes = field(repr=False)
    seed: bytes = field(repr=False)


@dataclass(frozen=True)
class ClientShared:
    """After stage 2: also the neighbours' public keys and the client's own share of its seed."""

    params: SecAggParams
    client_id: int
    enc_sk: bytes = field(repr=False)
    mask_sk: bytes = field(repr=False)
    seed: bytes = field(repr=False)
    peers: dict[int, tuple[bytes, bytes]] = field(repr=False)  # id -> (encryption pk, mask pk)
    own_seed_share: bytes = field(repr=False)


@dataclass(frozen=True)
class ClientMasked:
    """After stage 3: only the shares it holds for others (its own keys and seed are no longer needed)."""

    params: SecAggParams
    client_id: int
    seed_shares: dict[int, bytes] = field(repr=False)  # owner -> share of owner's seed (own included)
    key_shares: dict[int, bytes] = field(repr=False)  # owner -> share of owner's mask private key


# ---- client steps -------------------------------------------------------------------------------------------

def client_advertise(params: SecAggParams, client_id: int,
                     entropy: Entropy = os.urandom) -> tuple[ClientAdvertised, bytes]:
    """Stage 1: make the two key pairs and the self-mask seed; send the public keys.

    ``entropy`` is os.urandom in production; tests pass a seeded source so statistical checks are reproducible.
    """
    if client_id not in params.client_ids:
        raise SecAggError(f"client_advertise: client {client_id} is not sampled in this round")
    enc, mask = crypto.new_private_key(entropy), crypto.new_private_key(entropy)
    state = ClientAdvertised(params, client_id, crypto.private_raw(enc), crypto.private_raw(mask),
                             crypto.fresh_secret(entropy))
    return state, encode_advertise(params, Advertise(client_id, crypto.public_raw(enc), crypto.public_raw(mask)))


def client_share(state: ClientAdvertised, keys_message: bytes) -> tuple[ClientShared, bytes]:
    """Stage 2: Shamir-share b_i and the mask key among the neighbourhood; encrypt each neighbour's pair.

    Shares are made for the whole neighbourhood (the index is fixed by the public graph) and sent to those
    that advertised; the client keeps its own share of b_i for the unmasking.
    """
    p, me = state.params, state.client_id
    msg = parse_keys(p, keys_message)
    if msg.recipient != me:
        raise SecAggError(f"KEYS message: addressed to client {msg.recipient}, this is client {me}")
    own_enc, own_mask = (crypto.public_raw(crypto.load_private(k, "own key")) for k in (state.enc_sk, state.mask_sk))
    seen = {own_enc, own_mask}
    for j, e, m in msg.peers:
        if j not in p.graph[me]:
            raise SecAggError(f"KEYS message: client {j} is not a neighbour of client {me}")
        if e in seen or m in seen or e == m:
            raise SecAggError(f"KEYS message: client {j}'s public keys repeat a key already seen")
        seen.update((e, m))
    _need(p, me, len(msg.peers), "KEYS message")

    holders = p.holders(me)
    seed_shares = crypto.share_secret(state.seed, p.t, len(holders))
    key_shares = crypto.share_secret(state.mask_sk, p.t, len(holders))
    enc_sk = crypto.load_private(state.enc_sk, "own encryption key")
    cts = []
    for j, enc_pk, _ in msg.peers:
        idx = holders.index(j)
        key = _enc_key(p, enc_sk, enc_pk, me, j)
        cts.append((j, crypto.seal(key, seed_shares[idx] + key_shares[idx], _share_ad(p, me, j))))
    commitment = crypto.commit(state.seed, p.digest, me)
    new = ClientShared(p, me, state.enc_sk, state.mask_sk, state.seed,
                       {j: (e, m) for j, e, m in msg.peers}, seed_shares[holders.index(me)])
    return new, encode_shares(p, Shares(me, commitment, tuple(cts)))


def client_masked_input(state: ClientShared, routed_message: bytes,
                        values: np.ndarray) -> tuple[ClientMasked, bytes]:
    """Stage 3: decrypt the neighbours' shares, then send y_i = x_i + PRG(b_i) + sum_j +-PRG(s_ij) mod 2^R.

    ``values`` is this client's vector already clipped and quantized (``quantize``): uint64 ring elements.
    Masks are added only with the neighbours whose shares arrived (U2): the server can remove exactly those.
    Send at most one masked vector per round: two vectors under the same masks reveal their difference.
    """
    p, me = state.params, state.client_id
    x = _check_ring_vector(p, values)
    msg = parse_routed(p, routed_message)
    if msg.recipient != me:
        raise SecAggError(f"ROUTED message: addressed to client {msg.recipient}, this is client {me}")
    _need(p, me, len(msg.ciphertexts), "ROUTED message")
    enc_sk = crypto.load_private(state.enc_sk, "own encryption key")
    mask_sk = crypto.load_private(state.mask_sk, "own mask key")
    seed_shares, key_shares = {me: state.own_seed_share}, {}
    y = x + _self_mask(p, state.seed, me)
    for j, ct in msg.ciphertexts:
        if j not in state.peers:
            raise SecAggError(f"ROUTED message: shares from client {j}, whose keys this client never received")
        enc_pk, mask_pk = state.peers[j]
        plain = crypto.open_sealed(_enc_key(p, enc_sk, enc_pk, j, me), ct, _share_ad(p, j, me),
                                   f"ROUTED message: shares from client {j}")
        seed_shares[j], key_shares[j] = plain[:KEY_BYTES], plain[KEY_BYTES:]
        mask = _pair_mask(p, mask_sk, mask_pk, me, j)
        y = y + mask if me < j else y - mask  # uint64 wraps mod 2^64; reduced mod 2^R below
    y &= ring_mask(p.ring_bits)
    return ClientMasked(p, me, seed_shares, key_shares), encode_masked(p, Masked(me, y))


def client_unmask(state: ClientMasked, request_message: bytes) -> bytes:
    """Stage 4: for each neighbour, the share of its seed if it survived, of its mask key if it dropped.

    Never both for one neighbour, and nothing if fewer than t of the neighbourhood survived (the sum would
    then cover too few clients). Call once per round: an honest client answers one request only.
    """
    p, me = state.params, state.client_id
    msg = parse_unmask_request(p, request_message)
    if msg.recipient != me:
        raise SecAggError(f"UNMASK_REQUEST message: addressed to client {msg.recipient}, this is client {me}")
    survivors, dropped = set(msg.survivors), set(msg.dropped)
    if survivors & dropped:
        raise SecAggError(f"UNMASK_REQUEST message: clients {sorted(survivors & dropped)} are listed both as "
                          f"survivors and as dropped")
    if me in survivors or me in dropped:
        raise SecAggError("UNMASK_REQUEST message: lists the recipient itself")
    unknown = (survivors | dropped) - set(state.key_shares)
    if unknown:
        raise SecAggError(f"UNMASK_REQUEST message: clients {sorted(unknown)} never sent this client shares")
    _need(p, me, len(survivors), "UNMASK_REQUEST message")
    out = [(j, ShareKind.SEED, state.seed_shares[j]) for j in survivors | {me}]
    out += [(j, ShareKind.MASK_KEY, state.key_shares[j]) for j in dropped]
    return encode_unmask(p, Unmask(me, tuple(sorted(out))))


def _check_ring_vector(p: SecAggParams, values: np.ndarray) -> np.ndarray:
    v = np.asarray(values)
    if v.ndim != 1 or v.shape[0] != p.length:
        raise SecAggError(f"client_masked_input: expected {p.length} values, got shape {v.shape}")
    if not np.issubdtype(v.dtype, np.integer):
        raise SecAggError(f"client_masked_input: values must be quantized ring integers, got {v.dtype}")
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 1 << p.ring_bits):
        raise SecAggError(f"client_masked_input: values must lie in [0, 2^{p.ring_bits}) (use quantize)")
    return v.astype(np.uint64)


# ---- server states and steps ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerKeys:
    """After routing keys: U1's public keys and which neighbours' keys each client was sent."""

    params: SecAggParams
    keys: dict[int, tuple[bytes, bytes]]
    sent: dict[int, tuple[int, ...]]


@dataclass(frozen=True)
class ServerShares:
    """After routing shares: U2, each member's seed commitment, and its neighbours in U2 (its mask partners)."""

    params: SecAggParams
    keys: dict[int, tuple[bytes, bytes]]
    commitments: dict[int, bytes]
    partners: dict[int, tuple[int, ...]]


@dataclass(frozen=True)
class ServerMasked:
    """After collecting masked vectors: their running sum (still masked), U3, U2 \\ U3 and the requests sent."""

    params: SecAggParams
    keys: dict[int, tuple[bytes, bytes]]
    commitments: dict[int, bytes]
    partners: dict[int, tuple[int, ...]]
    contributors: tuple[int, ...]
    dropped: tuple[int, ...]
    masked_sum: np.ndarray = field(repr=False)
    requests: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class SecAggResult:
    """The round's output: the ring sum of the contributors' quantized vectors, and who they are."""

    params: SecAggParams
    sum_ring: np.ndarray
    contributors: tuple[int, ...]
    """Clients whose vector is in the sum (U3), sorted: divide by len(contributors) for a mean."""
    dropped: tuple[int, ...]
    """Sampled clients whose vector is not in the sum."""

    def dequantize(self) -> np.ndarray:
        """The float sum (see ``dequantize_sum``)."""
        return dequantize_sum(self.sum_ring, len(self.contributors), self.params.quant)


def _from(messages: Mapping[int, bytes], allowed: set[int] | frozenset[int], what: str) -> None:
    extra = set(messages) - set(allowed)
    if extra:
        raise SecAggError(f"{what}: messages from clients {sorted(extra)}, who are not expected at this stage")


def server_route_keys(params: SecAggParams,
                      advertisements: Mapping[int, bytes]) -> tuple[ServerKeys, dict[int, bytes]]:
    """Stage 1 (server): each advertiser gets the public keys of its neighbours that advertised too.

    ``advertisements`` maps the client id the transport authenticated to its message; a client that sent
    nothing has dropped. Raises SecAggAbort if a neighbourhood is already under the threshold.
    """
    _from(advertisements, set(params.client_ids), "ADVERTISE messages")
    keys: dict[int, tuple[bytes, bytes]] = {}
    for node, buf in advertisements.items():
        m = parse_advertise(params, buf)
        _check_sender(m.sender, node, "ADVERTISE message")
        keys[node] = (m.enc_pk, m.mask_pk)
    all_pks = [k for pair in keys.values() for k in pair]
    if len(set(all_pks)) != len(all_pks):
        raise SecAggError("ADVERTISE messages: two advertised public keys are identical")
    out, sent = {}, {}
    for i in sorted(keys):
        peers = tuple(sorted(params.graph[i] & keys.keys()))
        _need(params, i, len(peers), "route keys")
        sent[i] = peers
        out[i] = encode_keys(params, Keys(i, tuple((j, *keys[j]) for j in peers)))
    return ServerKeys(params, keys, sent), out


def server_route_shares(state: ServerKeys,
                        shares: Mapping[int, bytes]) -> tuple[ServerShares, dict[int, bytes]]:
    """Stage 2 (server): forward each ciphertext to its recipient, among the clients that sent theirs (U2).

    The server cannot read the shares (AEAD under keys from client-to-client agreement); it checks that each
    client encrypted for exactly the neighbours whose keys it was sent.
    """
    p = state.params
    _from(shares, set(state.keys), "SHARES messages")
    commitments, cts = {}, {}
    for node, buf in shares.items():
        m = parse_shares(p, buf)
        _check_sender(m.sender, node, "SHARES message")
        if tuple(j for j, _ in m.ciphertexts) != state.sent[node]:
            raise SecAggError(f"SHARES message from client {node}: ciphertexts are not addressed to exactly the "
                              f"neighbours whose keys it was sent")
        commitments[node] = m.commitment
        cts[node] = dict(m.ciphertexts)
    out, partners = {}, {}
    for i in sorted(cts):
        peers = tuple(j for j in state.sent[i] if j in cts)
        _need(p, i, len(peers), "route shares")
        partners[i] = peers
        out[i] = encode_routed(p, Routed(i, tuple((j, cts[j][i]) for j in peers)))
    return ServerShares(p, state.keys, commitments, partners), out


def server_unmask_request(state: ServerShares,
                          masked: Mapping[int, bytes]) -> tuple[ServerMasked, dict[int, bytes]]:
    """Stage 3 (server): add up the masked vectors (U3) and ask each sender which neighbours to unmask.

    The server only ever adds masked vectors into one running sum; an individual y_i is uniform on the ring to
    anyone without b_i. Raises SecAggAbort if a surviving neighbourhood is under the threshold.
    """
    p = state.params
    _from(masked, set(state.partners), "MASKED messages")
    total = np.zeros(p.length, dtype=np.uint64)
    for node, buf in masked.items():
        m = parse_masked(p, buf)
        _check_sender(m.sender, node, "MASKED message")
        total += m.values
    total &= ring_mask(p.ring_bits)
    u3 = tuple(sorted(masked))
    dropped = tuple(sorted(set(state.partners) - set(masked)))
    requests, out = {}, {}
    for i in u3:
        surv = tuple(j for j in state.partners[i] if j in masked)
        gone = tuple(j for j in state.partners[i] if j not in masked)
        _need(p, i, len(surv), "unmask request")
        requests[i] = (surv, gone)
        out[i] = encode_unmask_request(p, UnmaskRequest(i, surv, gone))
    return ServerMasked(p, state.keys, state.commitments, state.partners, u3, dropped, total, requests), out


def server_sum(state: ServerMasked, responses: Mapping[int, bytes]) -> SecAggResult:
    """Stage 4 (server): rebuild seeds and dropped clients' mask keys from >= t shares, remove their masks.

    A client that sent y_i but not its unmask answer is still in the sum: its seed comes from its neighbours'
    shares. Each rebuilt secret is checked (seed against its commitment, mask key against the advertised
    public key), so a wrong share is an error, never a silently wrong sum.
    """
    p = state.params
    _from(responses, set(state.requests), "UNMASK messages")
    seed_shares: dict[int, list[tuple[int, bytes]]] = {j: [] for j in state.contributors}
    key_shares: dict[int, list[tuple[int, bytes]]] = {j: [] for j in state.dropped}
    for node, buf in responses.items():
        m = parse_unmask(p, buf)
        _check_sender(m.sender, node, "UNMASK message")
        surv, gone = state.requests[node]
        expected = sorted([(j, ShareKind.SEED) for j in (*surv, node)] + [(j, ShareKind.MASK_KEY) for j in gone])
        if [(o, w) for o, w, _ in m.shares] != expected:
            raise SecAggError(f"UNMASK message from client {node}: its shares are not the ones requested")
        for owner, what, share in m.shares:
            bucket = seed_shares if what == ShareKind.SEED else key_shares
            bucket[owner].append((p.share_index(owner, node), share))

    total = state.masked_sum.copy()
    for j in state.contributors:
        seed = crypto.combine_shares(seed_shares[j], p.t, f"self-mask seed of client {j}")
        if crypto.commit(seed, p.digest, j) != state.commitments[j]:
            raise SecAggError(f"self-mask seed of client {j}: the rebuilt seed does not match its commitment "
                              f"(a share is wrong)")
        total -= _self_mask(p, seed, j)
    for j in state.dropped:
        raw = crypto.combine_shares(key_shares[j], p.t, f"mask key of dropped client {j}")
        sk = crypto.load_private(raw, f"mask key of dropped client {j}")
        if crypto.public_raw(sk) != state.keys[j][1]:
            raise SecAggError(f"mask key of dropped client {j}: the rebuilt key does not match its advertised "
                              f"public key (a share is wrong)")
        for i in state.partners[j]:
            if i not in state.requests:
                continue  # i dropped too: its vector is not in the sum (the pair's two corrections cancel)
            mask = _pair_mask(p, sk, state.keys[i][1], i, j)
            total = total - mask if i < j else total + mask  # undo i's sign(i, j) * PRG(s_ij)
    total &= ring_mask(p.ring_bits)
    not_in = tuple(sorted(set(p.client_ids) - set(state.contributors)))
    return SecAggResult(p, total, state.contributors, not_in)


# ---- keeping a client's state between messages (Flower starts a fresh process for each message) --------

_STAGES = {ClientAdvertised: 1, ClientShared: 2, ClientMasked: 3}


def client_state_to_bytes(state: ClientAdvertised | ClientShared | ClientMasked) -> bytes:
    """A client state as bytes for the node's own storage between stages (it holds secrets: never send it).

    Same header as the messages (so it is bound to the round's parameters), then the stage and its fields.
    """
    stage = _STAGES[type(state)]
    out = [header(state.params, Kind.CLIENT_STATE), bytes([stage]), pack_id(state.client_id)]
    if isinstance(state, (ClientAdvertised, ClientShared)):
        out += [state.enc_sk, state.mask_sk, state.seed]
    if isinstance(state, ClientShared):
        out += [state.own_seed_share, pack_count(len(state.peers))]
        out += [pack_id(j) + e + m for j, (e, m) in sorted(state.peers.items())]
    if isinstance(state, ClientMasked):
        for table in (state.seed_shares, state.key_shares):
            out += [pack_count(len(table))] + [pack_id(j) + s for j, s in sorted(table.items())]
    return b"".join(out)


def client_state_from_bytes(params: SecAggParams, blob: bytes) -> ClientAdvertised | ClientShared | ClientMasked:
    """Inverse of ``client_state_to_bytes``, with the same strict checks as a message."""
    r: Reader = open_message(params, blob, Kind.CLIENT_STATE)
    stage, me = r.u8("stage"), r.member(params, "client id")
    if stage not in (1, 2, 3):
        raise SecAggError(f"{r.what}: stage {stage} is not 1, 2 or 3")
    if stage in (1, 2):
        enc_sk, mask_sk, seed = (r.take(KEY_BYTES, f) for f in ("encryption key", "mask key", "seed"))
    if stage == 1:
        r.done()
        return ClientAdvertised(params, me, enc_sk, mask_sk, seed)
    if stage == 2:
        own = r.take(KEY_BYTES, "own seed share")
        n = r.count("peer count", params.degree, 8 + 2 * KEY_BYTES)
        peers = {}
        for _ in range(n):
            j = r.member(params, "peer", params.graph[me])
            peers[j] = (r.take(KEY_BYTES, "peer encryption key"), r.take(KEY_BYTES, "peer mask key"))
        r.done()
        if len(peers) != n:
            raise SecAggError(f"{r.what}: a peer is listed twice")
        return ClientShared(params, me, enc_sk, mask_sk, seed, peers, own)
    tables = []
    for name, most in (("seed shares", params.degree + 1), ("key shares", params.degree)):
        n = r.count(f"{name} count", most, 8 + KEY_BYTES)
        table = {r.member(params, "owner", params.graph[me] | {me}): r.take(KEY_BYTES, name) for _ in range(n)}
        if len(table) != n:
            raise SecAggError(f"{r.what}: an owner is listed twice in {name}")
        tables.append(table)
    r.done()
    return ClientMasked(params, me, tables[0], tables[1])
