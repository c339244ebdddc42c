"""SecAgg+ over shared-support vectors: exact sums with dropouts, masks that hide, strict bytes, honest counts."""

import itertools
import random
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cellm.core.secagg import (
    QuantSpec,
    SecAggAbort,
    SecAggError,
    SecAggParams,
    client_advertise,
    client_masked_input,
    client_share,
    client_state_from_bytes,
    client_state_to_bytes,
    client_unmask,
    crypto,
    dequantize,
    dequantize_sum,
    expected_traffic,
    message_sizes,
    quantize,
    server_route_keys,
    server_route_shares,
    server_sum,
    server_unmask_request,
    to_signed,
    wire,
)
from cellm.core.secagg.quantize import pack_ring, packed_size, unpack_ring
from cellm.core.secagg.wire import Routed, encode_routed, parse_masked, parse_routed

IDS = (3, 8, 21, 40, 41, 77, 90)


def make_params(ids=IDS, length=200, neighbours=0, threshold=0, session=b"round-0001-seed!", bits=8, clip=1.0,
                max_clients=16) -> SecAggParams:
    return SecAggParams(session=session, client_ids=tuple(ids), length=length,
                        quant=QuantSpec(clip=clip, value_bits=bits, max_clients=max_clients),
                        neighbours=neighbours, threshold=threshold)


def seeded_entropy(seed: int):
    return random.Random(seed).randbytes


def quantized_inputs(params: SecAggParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: quantize(rng.normal(0, 0.4, params.length), params.quant, np.random.default_rng([seed, i]))
            for i in params.client_ids}


def run_round(params, qs, *, never_advertise=(), drop_before_share=(), drop_after_share=(), drop_after_masked=(),
              keep_state_as_bytes=False, traffic=None):
    """One round; ``drop_*``: clients whose messages stop reaching the server at that point.

    never_advertise: no keys; drop_before_share: keys, no shares; drop_after_share: shares, no masked vector;
    drop_after_masked: masked vector, no unmask answer. Returns the server's result.
    """
    def log(batch):
        if traffic is not None:
            traffic.extend(zip(message_sizes(batch), batch.values(), strict=True))
        return batch

    def keep(state):
        if not keep_state_as_bytes:
            return state
        return client_state_from_bytes(params, client_state_to_bytes(state))

    states, up = {}, {}
    for i in params.client_ids:
        states[i], up[i] = client_advertise(params, i, entropy=seeded_entropy(i))
        states[i] = keep(states[i])
    srv, down = server_route_keys(params, log({i: m for i, m in up.items() if i not in never_advertise}))
    log(down)
    up = {}
    for i, msg in down.items():
        states[i], up[i] = client_share(states[i], msg)
        states[i] = keep(states[i])
    srv, down = server_route_shares(srv, log({i: m for i, m in up.items() if i not in drop_before_share}))
    log(down)
    up = {}
    for i, msg in down.items():
        states[i], up[i] = client_masked_input(states[i], msg, qs[i])
        states[i] = keep(states[i])
    srv, down = server_unmask_request(srv, log({i: m for i, m in up.items() if i not in drop_after_share}))
    log(down)
    up = {i: client_unmask(states[i], msg) for i, msg in down.items() if i not in drop_after_masked}
    return server_sum(srv, log(up))


def plain_sum(params, qs, ids):
    return sum(to_signed(qs[i], params.ring_bits) for i in ids)


def assert_exact(params, qs, result, expected_ids):
    assert result.contributors == tuple(sorted(expected_ids))
    got = to_signed(result.sum_ring, params.ring_bits)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, plain_sum(params, qs, expected_ids))


# ---- exact sums -----------------------------------------------------------------------------------------------

def test_the_unmasked_sum_equals_the_plain_sum_of_the_quantized_vectors_when_no_client_drops():
    p = make_params()
    qs = quantized_inputs(p)
    result = run_round(p, qs)
    assert_exact(p, qs, result, IDS)
    assert result.dropped == ()


def test_a_client_that_never_sends_its_shares_is_left_out_and_the_sum_of_the_rest_is_exact():
    p = make_params()
    qs = quantized_inputs(p, seed=12)
    assert_exact(p, qs, run_round(p, qs, drop_before_share=(90,)), set(IDS) - {90})


@pytest.mark.parametrize("gone", [(21,), (21, 40)])
def test_clients_that_drop_after_sharing_their_keys_are_left_out_and_the_sum_of_the_rest_is_exact(gone):
    p = make_params()
    qs = quantized_inputs(p, seed=1)
    result = run_round(p, qs, drop_after_share=gone)  # (21, 40): two dropped clients that masked with each other
    assert_exact(p, qs, result, set(IDS) - set(gone))
    assert result.dropped == gone


def test_a_client_that_drops_after_sending_its_masked_vector_is_still_in_the_exact_sum():
    p = make_params()
    qs = quantized_inputs(p, seed=2)
    result = run_round(p, qs, drop_after_masked=(40, 90))
    assert_exact(p, qs, result, IDS)


def test_dropouts_at_every_stage_on_a_sparse_neighbour_graph_still_give_the_exact_sum():
    ids = tuple(range(100, 110))
    p = make_params(ids=ids, neighbours=4, threshold=3)
    assert p.degree == 4
    qs = quantized_inputs(p, seed=3)
    # three dropouts, one at each stage, that leave every neighbourhood (5 members) at least t = 3 members
    a, b, c, d = next(d for d in itertools.permutations(ids, 4)
                      if all(len((p.graph[i] | {i}) - set(d)) >= 3 for i in ids))
    result = run_round(p, qs, never_advertise=(a,), drop_before_share=(b,), drop_after_share=(c,),
                       drop_after_masked=(d,))
    assert_exact(p, qs, result, set(ids) - {a, b, c})
    assert result.dropped == tuple(sorted((a, b, c)))


def test_the_float_sum_equals_the_sum_of_each_clients_dequantized_vector():
    p = make_params()
    qs = quantized_inputs(p, seed=4)
    result = run_round(p, qs, drop_after_share=(8,))
    expected = sum(dequantize(qs[i], p.quant) for i in result.contributors)
    np.testing.assert_allclose(result.dequantize(), expected, rtol=0, atol=1e-12)


def test_client_states_kept_as_bytes_between_stages_give_the_same_exact_sum():
    p = make_params(neighbours=4)
    qs = quantized_inputs(p, seed=5)
    assert_exact(p, qs, run_round(p, qs, drop_after_share=(77,), keep_state_as_bytes=True), set(IDS) - {77})


# ---- what a masked vector reveals -----------------------------------------------------------------------------

def test_a_masked_vector_alone_differs_from_the_quantized_vector_and_is_spread_evenly_over_the_ring():
    # All-zero inputs: unmasked, every value would be 0. Masked, they must look uniform on Z_{2^R}.
    p = make_params(ids=(1, 2, 3), length=16384)
    zeros = {i: np.zeros(p.length, dtype=np.uint64) for i in p.client_ids}
    states, up = {}, {}
    for i in p.client_ids:
        states[i], up[i] = client_advertise(p, i, entropy=seeded_entropy(1000 + i))
    srv, down = server_route_keys(p, up)
    up = {}
    for i in p.client_ids:
        states[i], up[i] = client_share(states[i], down[i])
    srv, down = server_route_shares(srv, up)
    _, masked = client_masked_input(states[2], down[2], zeros[2])
    y = parse_masked(p, masked).values
    assert int((y == 0).sum()) < 20  # about 2^-R of 16384 by chance; 0 everywhere without the mask
    r = p.ring_bits
    u = y.astype(np.float64) / 2**r
    n = u.size
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)  # mean of U(0, 1): 5 standard errors
    counts = np.bincount((y >> np.uint64(r - 6)).astype(np.int64), minlength=64)  # top 6 bits: 64 bins
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 130  # 63 degrees of freedom: p < 1e-6 above 130; a constant vector scores ~10^6


def test_the_masks_of_one_client_change_when_its_keys_change():
    p = make_params(ids=(1, 2, 3), length=64)
    q = np.zeros(p.length, dtype=np.uint64)
    outs = []
    for seed in (1, 2):
        states, up = {}, {}
        for i in p.client_ids:
            states[i], up[i] = client_advertise(p, i, entropy=seeded_entropy(seed * 10 + i))
        srv, down = server_route_keys(p, up)
        up = {}
        for i in p.client_ids:
            states[i], up[i] = client_share(states[i], down[i])
        _, down = server_route_shares(srv, up)
        outs.append(parse_masked(p, client_masked_input(states[1], down[1], q)[1]).values)
    assert not np.array_equal(outs[0], outs[1])


# ---- thresholds -----------------------------------------------------------------------------------------------

def test_fewer_shares_than_the_threshold_cannot_rebuild_a_secret():
    secret = bytes(range(32))
    shares = crypto.share_secret(secret, threshold=3, num=5)
    assert crypto.combine_shares([(2, shares[1]), (4, shares[3]), (5, shares[4])], 3, "s") == secret
    with pytest.raises(SecAggAbort, match="2 shares, fewer than the threshold 3"):
        crypto.combine_shares([(2, shares[1]), (4, shares[3])], 3, "s")


def test_the_server_cannot_finish_when_too_many_clients_drop_before_unmasking():
    p = make_params(ids=(1, 2, 3, 4, 5))
    assert p.t == 3
    qs = quantized_inputs(p, seed=6)
    with pytest.raises(SecAggAbort, match="self-mask seed of client .*fewer than the threshold 3"):
        run_round(p, qs, drop_after_masked=(1, 2, 3))


def test_the_server_aborts_when_fewer_than_the_threshold_send_masked_vectors():
    p = make_params(ids=(1, 2, 3, 4, 5))
    qs = quantized_inputs(p, seed=7)
    with pytest.raises(SecAggAbort, match="threshold 3"):
        run_round(p, qs, drop_after_share=(1, 2, 3))


def test_a_client_never_answers_for_a_neighbour_listed_both_as_survivor_and_as_dropped():
    p = make_params(ids=(1, 2, 3, 4))
    qs = quantized_inputs(p, seed=8)
    states, up = {}, {}
    for i in p.client_ids:
        states[i], up[i] = client_advertise(p, i)
    srv, down = server_route_keys(p, up)
    up = {}
    for i in p.client_ids:
        states[i], up[i] = client_share(states[i], down[i])
    srv, down = server_route_shares(srv, up)
    st1, _ = client_masked_input(states[1], down[1], qs[1])
    bad = wire.encode_unmask_request(p, wire.UnmaskRequest(1, (2, 3, 4), (2,)))
    with pytest.raises(SecAggError, match="both as survivors and as dropped"):
        client_unmask(st1, bad)


# ---- malformed, tampered and misdirected bytes ----------------------------------------------------------------

def _round_messages(p):
    """Every kind of message of one round, with the state that parses it."""
    qs = quantized_inputs(p, seed=9)
    states, adv = {}, {}
    for i in p.client_ids:
        states[i], adv[i] = client_advertise(p, i)
    srv, keys = server_route_keys(p, adv)
    shares = {}
    for i in p.client_ids:
        states[i], shares[i] = client_share(states[i], keys[i])
    srv, routed = server_route_shares(srv, shares)
    masked = {}
    for i in p.client_ids:
        states[i], masked[i] = client_masked_input(states[i], routed[i], qs[i])
    srv, req = server_unmask_request(srv, masked)
    unm = {i: client_unmask(states[i], req[i]) for i in p.client_ids}
    return {"advertise": adv, "keys": keys, "shares": shares, "routed": routed, "masked": masked,
            "unmask_request": req, "unmask": unm}


PARSERS = {"advertise": wire.parse_advertise, "keys": wire.parse_keys, "shares": wire.parse_shares,
           "routed": wire.parse_routed, "masked": wire.parse_masked, "unmask_request": wire.parse_unmask_request,
           "unmask": wire.parse_unmask}


@pytest.fixture(scope="module")
def round_messages():
    p = make_params(ids=(5, 6, 7, 8), length=37)  # 37 x R bits: not a whole number of bytes
    return p, _round_messages(p)


@pytest.mark.parametrize("kind", sorted(PARSERS))
def test_every_truncated_or_extended_message_is_refused(round_messages, kind):
    p, msgs = round_messages
    buf = next(iter(msgs[kind].values()))
    PARSERS[kind](p, buf)  # the intact message parses
    for cut in sorted({0, 3, 5, 21, 22, 30, len(buf) // 2, len(buf) - 1}):
        with pytest.raises(SecAggError):
            PARSERS[kind](p, buf[:cut])
    with pytest.raises(SecAggError, match="unexpected bytes after the last field"):
        PARSERS[kind](p, buf + b"\x00")


def test_header_errors_name_what_is_wrong(round_messages):
    p, msgs = round_messages
    buf = msgs["masked"][5]
    with pytest.raises(SecAggError, match="bad magic"):
        wire.parse_masked(p, b"XXXX" + buf[4:])
    with pytest.raises(SecAggError, match="version 2"):
        wire.parse_masked(p, buf[:4] + b"\x02" + buf[5:])
    with pytest.raises(SecAggError, match="got a ROUTED message instead"):
        wire.parse_masked(p, msgs["routed"][5])
    other_round = make_params(ids=(5, 6, 7, 8), length=37, session=b"round-0002-seed!")
    with pytest.raises(SecAggError, match="params digest does not match"):
        wire.parse_masked(other_round, buf)


def test_a_truncated_masked_vector_names_its_bad_length(round_messages):
    p, msgs = round_messages
    buf = msgs["masked"][6]
    with pytest.raises(SecAggError, match="truncated in packed values"):
        wire.parse_masked(p, buf[:-1])


def test_nonzero_padding_bits_after_the_last_masked_value_are_refused(round_messages):
    p, msgs = round_messages
    assert (p.length * p.ring_bits) % 8  # the last byte has padding bits
    buf = bytearray(msgs["masked"][7])
    buf[-1] |= 1
    with pytest.raises(SecAggError, match="padding bits"):
        wire.parse_masked(p, bytes(buf))


def test_a_tampered_share_ciphertext_fails_authentication():
    p = make_params(ids=(1, 2, 3))
    states, up = {}, {}
    for i in p.client_ids:
        states[i], up[i] = client_advertise(p, i)
    srv, down = server_route_keys(p, up)
    up = {}
    for i in p.client_ids:
        states[i], up[i] = client_share(states[i], down[i])
    _, routed = server_route_shares(srv, up)
    buf = bytearray(routed[1])
    buf[-5] ^= 0x40  # inside the last ciphertext
    with pytest.raises(SecAggError, match="shares from client 3: authentication failed"):
        client_masked_input(states[1], bytes(buf), np.zeros(p.length, dtype=np.uint64))


def test_a_ciphertext_passed_off_as_from_another_sender_fails_authentication():
    # The associated data binds the sender and recipient ids: relabelling a ciphertext is caught.
    p = make_params(ids=(1, 2, 3))
    states, up = {}, {}
    for i in p.client_ids:
        states[i], up[i] = client_advertise(p, i)
    srv, down = server_route_keys(p, up)
    up = {}
    for i in p.client_ids:
        states[i], up[i] = client_share(states[i], down[i])
    _, routed = server_route_shares(srv, up)
    (a, ct_a), (b, ct_b) = parse_routed(p, routed[1]).ciphertexts
    swapped = encode_routed(p, Routed(1, ((a, ct_b), (b, ct_a))))
    with pytest.raises(SecAggError, match="authentication failed"):
        client_masked_input(states[1], swapped, np.zeros(p.length, dtype=np.uint64))


def test_a_message_whose_sender_field_differs_from_the_transport_id_is_refused():
    p = make_params(ids=(1, 2, 3))
    up = {i: client_advertise(p, i)[1] for i in p.client_ids}
    with pytest.raises(SecAggError, match="sender field says 2 but the message came from client 1"):
        server_route_keys(p, {1: up[2], 3: up[3]})


def test_messages_from_clients_outside_the_round_are_refused():
    p = make_params(ids=(1, 2, 3))
    up = {i: client_advertise(p, i)[1] for i in p.client_ids}
    with pytest.raises(SecAggError, match=r"clients \[9\]"):
        server_route_keys(p, {**up, 9: up[1]})


def test_a_masked_input_outside_the_ring_is_refused_before_anything_is_sent():
    p = make_params(ids=(1, 2, 3))
    states, up = {}, {}
    for i in p.client_ids:
        states[i], up[i] = client_advertise(p, i)
    srv, down = server_route_keys(p, up)
    up = {}
    for i in p.client_ids:
        states[i], up[i] = client_share(states[i], down[i])
    _, routed = server_route_shares(srv, up)
    too_big = np.full(p.length, 1 << p.ring_bits, dtype=np.uint64)
    with pytest.raises(SecAggError, match="use quantize"):
        client_masked_input(states[1], routed[1], too_big)
    with pytest.raises(SecAggError, match="expected 200 values"):
        client_masked_input(states[1], routed[1], np.zeros(5, dtype=np.uint64))


def test_a_client_state_blob_that_was_cut_is_refused():
    p = make_params(ids=(1, 2, 3))
    state, _ = client_advertise(p, 1)
    blob = client_state_to_bytes(state)
    assert client_state_from_bytes(p, blob) == state
    with pytest.raises(SecAggError, match="truncated"):
        client_state_from_bytes(p, blob[:-1])


# ---- quantization ---------------------------------------------------------------------------------------------

SPEC = st.builds(QuantSpec, clip=st.floats(1e-3, 1e3), value_bits=st.integers(2, 24),
                 max_clients=st.integers(1, 64), margin_bits=st.integers(0, 1))


@settings(max_examples=80, deadline=None, derandomize=True)
@given(spec=SPEC, data=st.data(), stochastic=st.booleans())
def test_the_ring_sum_of_quantized_vectors_is_their_exact_sum_within_the_declared_error(spec, data, stochastic):
    m = data.draw(st.integers(1, spec.max_clients), label="clients")
    n = data.draw(st.integers(1, 20), label="length")
    floats = st.floats(-3 * spec.clip, 3 * spec.clip, allow_nan=False)
    xs = [data.draw(arrays(np.float64, n, elements=floats), label=f"x{c}") for c in range(m)]
    qs = [quantize(x, spec, np.random.default_rng(c) if stochastic else None) for c, x in enumerate(xs)]
    ring = np.zeros(n, dtype=np.uint64)
    for q in qs:
        assert int(q.max()) < 1 << spec.ring_bits
        ring = (ring + q) & np.uint64((1 << spec.ring_bits) - 1)
    ints = sum(to_signed(q, spec.ring_bits) for q in qs)
    np.testing.assert_array_equal(to_signed(ring, spec.ring_bits), ints)  # no wraparound
    total = dequantize_sum(ring, m, spec)
    np.testing.assert_allclose(total, sum(dequantize(q, spec) for q in qs), rtol=1e-12, atol=1e-9 * spec.clip)
    clipped = sum(np.clip(x, -spec.clip, spec.clip) for x in xs)
    tol = m * spec.max_abs_error(stochastic) * (1 + 1e-9) + 1e-9 * spec.clip * m
    assert np.abs(total - clipped).max() <= tol


@settings(max_examples=40, deadline=None, derandomize=True)
@given(spec=SPEC)
def test_max_clients_all_at_the_clip_bound_do_not_wrap_the_ring(spec):
    for sign in (1.0, -1.0):
        q = quantize(np.full(3, sign * spec.clip), spec)
        ring = (q * np.uint64(spec.max_clients)) & np.uint64((1 << spec.ring_bits) - 1)
        np.testing.assert_allclose(dequantize_sum(ring, spec.max_clients, spec), sign * spec.clip * spec.max_clients,
                                   rtol=1e-12)


def test_the_ring_has_value_bits_plus_log2_clients_plus_margin_bits():
    assert QuantSpec(1.0, 8, 16).ring_bits == 12
    assert QuantSpec(1.0, 8, 17).ring_bits == 13
    assert QuantSpec(1.0, 4, 5, margin_bits=1).ring_bits == 8
    assert QuantSpec(1.0, 8, 1).ring_bits == 8


def test_a_sum_no_such_number_of_clients_can_make_is_refused():
    spec = QuantSpec(1.0, 4, 8)
    q = quantize(np.full(2, 1.0), spec)  # 7 grid steps each
    with pytest.raises(SecAggError, match="exceeds the 7"):
        dequantize_sum((q + q) & np.uint64(2**spec.ring_bits - 1), 1, spec)


def test_nan_values_are_refused_and_infinities_clip():
    spec = QuantSpec(2.0, 8, 4)
    np.testing.assert_allclose(dequantize(quantize(np.array([np.inf, -np.inf]), spec), spec), [2.0, -2.0])
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([0.0, np.nan]), spec)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(bits=st.integers(1, 64), data=st.data())
def test_ring_values_pack_into_exactly_r_bits_each_and_back(bits, data):
    n = data.draw(st.integers(0, 40))
    vals = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)), dtype=np.uint64)
    buf = pack_ring(vals, bits)
    assert len(buf) == packed_size(n, bits) == (n * bits + 7) // 8
    np.testing.assert_array_equal(unpack_ring(buf, n, bits), vals)


def test_packing_spans_several_blocks():
    vals = np.random.default_rng(0).integers(0, 2**13, 200_003).astype(np.uint64)
    np.testing.assert_array_equal(unpack_ring(pack_ring(vals, 13), vals.size, 13), vals)


# ---- the neighbour graph and the parameters ---------------------------------------------------------------------

def test_the_neighbour_graph_is_symmetric_regular_and_derived_from_the_session_alone():
    ids = tuple(range(1000, 1030))
    p = make_params(ids=ids, neighbours=6, max_clients=32)
    again = make_params(ids=tuple(reversed(ids)), neighbours=6, max_clients=32)
    assert p.graph == again.graph
    for i, nbrs in p.graph.items():
        assert len(nbrs) == 6 and i not in nbrs
        assert all(i in p.graph[j] for j in nbrs)
    other = make_params(ids=ids, neighbours=6, max_clients=32, session=b"another-session!")
    assert other.graph != p.graph


def test_a_small_round_uses_everyone_as_neighbours_and_a_majority_threshold():
    p = make_params(neighbours=10)
    assert p.degree == len(IDS) - 1 and p.t == 4  # a majority of the 7 in a neighbourhood
    assert all(len(n) == len(IDS) - 1 for n in p.graph.values())


def test_parameters_out_of_range_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        make_params(ids=(1,))
    with pytest.raises(ValueError, match="threshold 9"):
        make_params(threshold=9)
    with pytest.raises(ValueError, match="max_clients"):
        make_params(ids=range(20), max_clients=16)
    with pytest.raises(ValueError, match="duplicates"):
        make_params(ids=(1, 1, 2))


# ---- byte accounting ------------------------------------------------------------------------------------------

def test_the_byte_counts_match_the_actual_messages_and_the_prediction():
    p = make_params(length=1000)
    qs = quantized_inputs(p, seed=10)
    traffic = []
    run_round(p, qs, traffic=traffic)
    by_stage = defaultdict(lambda: {"up": 0, "down": 0})
    for row, buf in traffic:
        assert row.nbytes == len(buf)
        by_stage[row.kind][row.direction] += row.nbytes
    assert dict(by_stage) == expected_traffic(p)
    msgs = _round_messages(p)
    for kind, batch in msgs.items():
        rows = message_sizes(batch)
        assert [r.nbytes for r in rows] == [len(b) for b in batch.values()]
        assert {r.kind for r in rows} == {kind}
        assert {r.direction for r in rows} == {wire.DIRECTION[wire.Kind[kind.upper()]]}


def test_a_masked_vector_costs_ring_bits_per_value_not_32():
    p = make_params(length=1001)
    masked = _round_messages(p)["masked"]
    for buf in masked.values():
        assert len(buf) == wire.HEADER_BYTES + 8 + 4 + 1 + 4 + (1001 * p.ring_bits + 7) // 8
        assert len(buf) < 1001 * 2  # 12 bits a value here, far from fp32's 4 bytes


def test_byte_counts_with_dropouts_still_equal_the_message_lengths():
    p = make_params(neighbours=4)
    qs = quantized_inputs(p, seed=11)
    traffic = []
    run_round(p, qs, drop_after_share=(3,), drop_after_masked=(8,), traffic=traffic)
    assert all(row.nbytes == len(buf) for row, buf in traffic)
    kinds = defaultdict(int)
    for row, _ in traffic:
        kinds[row.kind] += 1
    n = len(IDS)
    assert dict(kinds) == {"advertise": n, "keys": n, "shares": n, "routed": n, "masked": n - 1,
                           "unmask_request": n - 1, "unmask": n - 2}
    masked = [row.nbytes for row, _ in traffic if row.kind == "masked"]
    assert masked == [wire.masked_size(p.length, p.ring_bits)] * (n - 1)
