"""SecAgg+ cost for one round: CPU seconds and bytes per stage and direction, against a plain values-only upload.

Run:  flock /tmp/cellm-cpu.lock .venv/bin/python bench/secagg.py
      [--clients 20] [--length 100000] [--bits 8] [--neighbours 0 6] [--drop-after-share 1] [--drop-after-masked 1]

For each neighbour degree (0 = everyone, plain SecAgg) it runs one whole round in this process, timing every
client step and server step separately (client seconds are the sum over clients; a real round runs them in
parallel, so divide by the clients for a client's own cost). ``--drop-after-share`` clients send their shares
but never their masked vector (the server rebuilds their mask keys); ``--drop-after-masked`` clients send
their masked vector but never answer the unmask request (the server rebuilds their seeds from shares). The
last row of each table checks the sum against the plain sum of the quantized vectors.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict

import numpy as np

from cellm.core.secagg import (
    QuantSpec,
    SecAggParams,
    client_advertise,
    client_masked_input,
    client_share,
    client_unmask,
    message_sizes,
    quantize,
    server_route_keys,
    server_route_shares,
    server_sum,
    server_unmask_request,
    to_signed,
)


def one_round(clients: int, length: int, bits: int, neighbours: int, drop_share: int, drop_masked: int) -> None:
    ids = list(range(1, clients + 1))
    params = SecAggParams(session=b"bench-secagg-r01", client_ids=tuple(ids), length=length,
                          quant=QuantSpec(clip=1.0, value_bits=bits, max_clients=clients), neighbours=neighbours)
    rng = np.random.default_rng(0)
    qs = {i: quantize(rng.normal(0, 0.3, length), params.quant, np.random.default_rng(i)) for i in ids}
    gone_share = set(ids[:drop_share])
    gone_masked = set(ids[drop_share:drop_share + drop_masked])
    secs: dict[str, float] = defaultdict(float)
    sizes: dict[tuple[str, str], int] = defaultdict(int)

    def timed(key, fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        secs[key] += time.process_time() - t0
        return out

    def count(batch):
        for row in message_sizes(batch):
            sizes[(row.kind, row.direction)] += row.nbytes
        return batch

    st, up = {}, {}
    for i in ids:
        st[i], up[i] = timed("1 advertise (clients)", client_advertise, params, i)
    srv, down = timed("1 route keys (server)", server_route_keys, params, count(up))
    count(down)
    up = {}
    for i in ids:
        st[i], up[i] = timed("2 share keys (clients)", client_share, st[i], down[i])
    srv, down = timed("2 route shares (server)", server_route_shares, srv, count(up))
    count(down)
    up = {}
    for i in ids:
        st[i], up[i] = timed("3 masked input (clients)", client_masked_input, st[i], down[i], qs[i])
    up = {i: m for i, m in up.items() if i not in gone_share}
    srv, down = timed("3 sum masked, request unmask (server)", server_unmask_request, srv, count(up))
    count(down)
    up = {i: timed("4 unmask (clients)", client_unmask, st[i], m) for i, m in down.items() if i not in gone_masked}
    result = timed("4 rebuild secrets, unmask sum (server)", server_sum, srv, count(up))

    expected = sum(to_signed(qs[i], params.ring_bits) for i in ids if i not in gone_share)
    exact = bool(np.array_equal(to_signed(result.sum_ring, params.ring_bits), expected))
    print(f"\n### {clients} clients x {length} values, {bits}-bit values in a {params.ring_bits}-bit ring, "
          f"degree {params.degree}, threshold {params.t}; {len(gone_share)} dropped after sharing, "
          f"{len(gone_masked)} after their masked vector\n")
    print("| step | CPU s (all parties of the step) |")
    print("|---|---|")
    for key, s in secs.items():
        print(f"| {key} | {s:.3f} |")
    client_s = sum(s for k, s in secs.items() if "(clients)" in k)
    server_s = sum(s for k, s in secs.items() if "(server)" in k)
    print(f"| total: clients (per client) / server | {client_s:.3f} ({client_s / clients:.3f}) / {server_s:.3f} |")
    print("\n| message | direction | bytes (all clients) | bytes per client |")
    print("|---|---|---|---|")
    for (kind, direction), b in sizes.items():
        print(f"| {kind} | {direction} | {b:,} | {b / clients:,.0f} |")
    up_b = sum(b for (_, d), b in sizes.items() if d == "up")
    down_b = sum(b for (_, d), b in sizes.items() if d == "down")
    senders = clients - len(gone_share)
    plain = senders * ((length * bits + 7) // 8)  # what the same senders' plain uploads would cost
    masked = sizes[("masked", "up")]
    print(f"| all protocol messages | up / down | {up_b:,} / {down_b:,} | {up_b / clients:,.0f} / "
          f"{down_b / clients:,.0f} |")
    print(f"\nplain {bits}-bit values-only uploads of the {senders} clients that sent a vector: {plain:,} bytes; "
          f"all secure-aggregation uploads / plain = {up_b / plain:.2f}x; masked vectors / plain = "
          f"{masked / plain:.2f}x; everything but the masked vectors (keys, shares, unmasking; up + down) = "
          f"{up_b + down_b - masked:,} bytes")
    print(f"sum over {len(result.contributors)} contributors exact: {exact}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--length", type=int, default=100_000)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--neighbours", type=int, nargs="+", default=[0, 6])
    ap.add_argument("--drop-after-share", type=int, default=1)
    ap.add_argument("--drop-after-masked", type=int, default=1)
    a = ap.parse_args()
    print(f"# SecAgg+ round cost ({platform.processor() or platform.machine()}, numpy {np.__version__}, "
          f"CPU time of this one process)")
    for k in a.neighbours:
        one_round(a.clients, a.length, a.bits, k, a.drop_after_share, a.drop_after_masked)


if __name__ == "__main__":
    main()
