"""Secure aggregation (SecAgg+) of shared-support uploads: the server learns the sum, not the vectors.

Every client of a round uploads values on the same support S in the same order, so vectors of |S| values can be
masked with pairwise masks that cancel in the sum (Bonawitz et al. 2017; the neighbour graph of SecAgg+, Bell
et al. 2020). Pure functions over explicit states, bytes in and bytes out; no I/O, no runtime, no flwr.
Cryptography comes from ``cryptography`` (X25519, HKDF-SHA256, ChaCha20-Poly1305, the ChaCha20 keystream as a
PRG) and pycryptodome (Shamir secret sharing over GF(2^128)); see ``crypto``.

One round, as a runtime drives it (``{id: bytes}`` maps are keyed by the client id the transport authenticated;
a client missing from a map has dropped)::

    params = SecAggParams(session=<16 bytes unique to the round>, client_ids=sampled, length=len(S),
                          quant=QuantSpec(clip=c, value_bits=B, max_clients=M), neighbours=k, threshold=0)
    # 1. advertise keys
    st[i], up = client_advertise(params, i)                      # on each client
    srv, down = server_route_keys(params, {i: up_i, ...})        # down[i] -> client i
    # 2. share keys
    st[i], up = client_share(st[i], down[i])
    srv, down = server_route_shares(srv, {i: up_i, ...})
    # 3. masked input (the client trains between 1 and 3, or before 1; it quantizes its clipped values)
    q_i = quantize(x_i, params.quant, rng=<seeded generator>)   # keep dequantize(q_i, ...) for error feedback
    st[i], up = client_masked_input(st[i], down[i], q_i)
    srv, down = server_unmask_request(srv, {i: up_i, ...})
    # 4. unmask
    up = client_unmask(st[i], down[i])
    result = server_sum(srv, {i: up_i, ...})                     # result.contributors: whose x is in the sum
    total = result.dequantize()                                   # float64 sum over result.contributors

Between stages a client state can be stored as bytes (``client_state_to_bytes`` / ``client_state_from_bytes``),
e.g. in Flower's ``context.state``: it holds the client's secrets, so it stays on the node. ``message_sizes``
gives every message's kind, direction ("up" client -> server, "down" server -> client) and bytes for the
ledger; ``expected_traffic`` predicts a round without dropouts. A ``SecAggAbort`` means a neighbourhood fell
under the threshold: skip the round's update; never fall back to reading single uploads.

Cost, measured with ``bench/secagg.py`` on this 2-core machine (CPU seconds; 20 clients x 100k values, 8-bit
values in a 13-bit ring, one client dropping after its shares and one after its masked vector):

- everyone a neighbour (degree 19, t = 11): under 0.02 s a client (all 20: 0.13-0.18 s sharing, 0.15 s
  masking), 0.25-0.4 s on the server (mostly rebuilding 19 seeds and 1 key with pure-Python Shamir, then the
  PRG streams; the range is the spread between runs on a shared machine); bytes a client: 154,412 for the
  masked vector, 6,345 for keys, shares and unmasking (up 2,829, down 3,516).
- degree 6 (t = 4): 0.006 s a client, 0.08 s on the server, 2,231 bytes a client besides the masked vector.
- 1M values, degree 19: 0.10 s a client, 0.67 s on the server: the PRG masks, O(k |S|), dominate.

The masked vector costs R / B of a plain B-bit values-only upload (13/8 = 1.63x here; 4-bit values with 20
clients: 9/4 = 2.25x, with 5 clients: 7/4 = 1.75x), which is why ``max_clients`` should be the round's sample
size, not the population. Keys, shares and unmasking add O(k) messages of under 100 bytes an entry a client.

Threat model and what it does not cover:

- The server is honest but curious: it follows the protocol and reads everything it receives. It sees each
  y_i, which is uniform on the ring without b_i, and the sum over the contributors U3. It never holds an
  unmasked single vector: it rebuilds b_j only for clients whose y_j is in the sum, and the mask key of j only
  for clients that dropped before sending y_j (an honest client never sends both shares for one neighbour).
  A server that lies about who dropped (asking some clients for j's seed and others for j's mask key) could
  unmask y_j; stopping that needs the signed consistency round of Bonawitz et al., not built here.
- A dropped client j's mask-key shares reveal its pairwise masks, which were never applied to anything the
  server holds (y_j was not sent), and nothing about x_j; a y_j that arrives late stays hidden by its
  self-mask, whose seed is then never rebuilt. A client that sent y_j and then dropped keeps its
  privacy: only its seed is rebuilt, and y_j is in the sum with everyone else's.
- A client sends at most one masked vector a round (one state, one call): two vectors under the same masks
  reveal their difference. A runtime that retries must resend the same bytes, not recompute them.
- Fewer than t colluding clients of a neighbourhood (with or without the server) learn nothing about another's
  seed or key from their shares. With 2 clients, each learns the other's vector from the sum and its own.
- Clients clip before masking: the server cannot check a single upload's norm or range, so per-client norm
  checks and robust aggregators (median, trimmed mean, Krum) are impossible; a malicious client can shift the
  sum by up to its clipped range. Central DP applies to the unmasked sum.
- The neighbour graph (degree k) lowers cost from O(n^2) to O(n k) masks and shares, but a neighbourhood
  tolerates fewer dropouts (k + 1 - t of them) and fewer colluders than the whole round would; with k = all
  (``neighbours=0``) this is plain SecAgg.
- Anyone on the network sees only ciphertexts of the shares (ChaCha20-Poly1305, bound to both client ids and
  the round); the rest should travel over TLS as every other message does.
"""

from cellm.core.secagg.errors import SecAggAbort, SecAggError
from cellm.core.secagg.params import SecAggParams
from cellm.core.secagg.protocol import (
    ClientAdvertised,
    ClientMasked,
    ClientShared,
    SecAggResult,
    ServerKeys,
    ServerMasked,
    ServerShares,
    client_advertise,
    client_masked_input,
    client_share,
    client_state_from_bytes,
    client_state_to_bytes,
    client_unmask,
    server_route_keys,
    server_route_shares,
    server_sum,
    server_unmask_request,
)
from cellm.core.secagg.quantize import QuantSpec, dequantize, dequantize_sum, quantize, to_signed
from cellm.core.secagg.wire import MessageSize, expected_traffic, message_sizes

__all__ = [
    "ClientAdvertised", "ClientMasked", "ClientShared", "MessageSize", "QuantSpec", "SecAggAbort", "SecAggError",
    "SecAggParams", "SecAggResult", "ServerKeys", "ServerMasked", "ServerShares", "client_advertise",
    "client_masked_input", "client_share", "client_state_from_bytes", "client_state_to_bytes", "client_unmask",
    "dequantize", "dequantize_sum", "expected_traffic", "message_sizes", "quantize", "server_route_keys",
    "server_route_shares", "server_sum", "server_unmask_request", "to_signed",
]
