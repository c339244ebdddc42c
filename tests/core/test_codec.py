"""The wire codec: exact round trips, stated error bounds, position costs against log2 C(N, k), strict headers."""

import math

import numpy as np
import pytest
import torch
from codec_fuzzing import craft, reseal, split
from hypothesis import given, settings
from hypothesis import strategies as st

from cellm.core.codec import CodecError, CodecSpec, bound_bits, decode, encode, roundtrip
from cellm.core.codec import header as hdr
from cellm.core.sparse import SparseVector

F32_MAX = float(np.finfo(np.float32).max)


@st.composite
def sparse_vectors(draw, max_n=600, min_value=None, max_value=None):
    """Any n (0 included), any subset of positions (empty and all included), any finite float32 values."""
    n = draw(st.integers(0, max_n))
    mode = draw(st.sampled_from(["subset", "empty", "dense", "run"]))
    if mode == "empty" or n == 0:
        idx = []
    elif mode == "dense":
        idx = list(range(n))
    elif mode == "run":
        a = draw(st.integers(0, n - 1))
        idx = list(range(a, draw(st.integers(a + 1, n))))
    else:
        idx = sorted(draw(st.sets(st.integers(0, n - 1), max_size=n)))
    floats = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False, width=32)
    vals = draw(st.lists(floats, min_size=len(idx), max_size=len(idx)))
    return SparseVector(n, torch.tensor(idx, dtype=torch.int64), torch.tensor(vals, dtype=torch.float32))


def vector(n, idx, vals):
    return SparseVector(
        n, torch.as_tensor(np.asarray(idx, dtype=np.int64)), torch.as_tensor(np.asarray(vals, np.float32))
    )


def random_vector(n, density, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    k = n if density >= 1 else int(n * density)
    idx = np.sort(rng.choice(n, k, replace=False))
    return vector(n, idx, rng.standard_normal(k) * scale)


def bits_of(t):
    return t.numpy().view(np.uint32)


def assert_same_positions(a, b):
    assert a.n == b.n
    assert a.indices.dtype == torch.int64 and b.values.dtype == torch.float32
    assert torch.equal(a.indices, b.indices)


# --- round trips -----------------------------------------------------------------------------------------


@given(
    sparse_vectors(),
    st.sampled_from(["auto", "bitmap", "gaps"]),
    st.sampled_from([0, 1, 3]),
)
@settings(max_examples=150, deadline=None)
def test_fp32_messages_round_trip_bit_for_bit_under_every_position_scheme_and_zstd(vec, positions, level):
    data = encode(vec, CodecSpec(values="fp32", positions=positions, zstd_level=level))
    out = decode(data, max_n=vec.n, expected_n=vec.n)
    assert_same_positions(out, vec)
    assert np.array_equal(bits_of(out.values), bits_of(vec.values))  # -0.0 and subnormals survive too


@given(sparse_vectors(min_value=-65504, max_value=65504), st.sampled_from([0, 3]))
@settings(max_examples=100, deadline=None)
def test_fp16_values_are_within_half_an_fp16_step(vec, level):
    out = decode(encode(vec, CodecSpec(values="fp16", zstd_level=level)), max_n=vec.n)
    assert_same_positions(out, vec)
    v, w = vec.values.double(), out.values.double()
    assert torch.all((v - w).abs() <= torch.clamp(v.abs() * 2.0**-11, min=2.0**-25))


@given(sparse_vectors(min_value=-(2.0**127), max_value=2.0**127), st.sampled_from([0, 3]))
@settings(max_examples=100, deadline=None)
def test_bf16_values_are_within_half_a_bf16_step(vec, level):
    out = decode(encode(vec, CodecSpec(values="bf16", zstd_level=level)), max_n=vec.n)
    assert_same_positions(out, vec)
    v, w = vec.values.double(), out.values.double()
    assert torch.all((v - w).abs() <= torch.clamp(v.abs() * 2.0**-8, min=2.0**-134))


def transmitted_scales(data):
    h, body = split(data)
    assert not h.flags & hdr.FLAG_ZSTD
    dtype = "<f2" if h.flags & hdr.FLAG_FP16_SCALES else "<f4"
    return np.frombuffer(body[h.pos_len : h.pos_len + h.scale_len], dtype).astype(np.float64), h.block_size


LEVELS = {"int8": 127, "int4": 7, "int2": 1}


@given(
    sparse_vectors(max_n=400),
    st.sampled_from([1, 2, 7, 256]),
    st.sampled_from(["fp32", "fp16"]),
    st.sampled_from(sorted(LEVELS)),
)
@settings(max_examples=300, deadline=None)
def test_block_scaled_values_are_within_half_their_block_scale(vec, block_size, scales, values):
    """int8, int4 and int2: scale absmax / L per block, every decoded value within half a scale of the sent one."""
    L = LEVELS[values]
    v = vec.values.double().numpy()
    if scales == "fp16" and v.size and np.abs(v).max() / L > 65504:
        with pytest.raises(ValueError, match="fp16"):
            encode(vec, CodecSpec(values=values, block_size=block_size, scales=scales))
        return
    data = encode(vec, CodecSpec(values=values, block_size=block_size, scales=scales))
    out = decode(data, max_n=vec.n)
    assert_same_positions(out, vec)
    s, bs = transmitted_scales(data)
    assert s.size == -(-v.size // block_size) and bs == block_size
    per = s[np.arange(v.size) // block_size]
    w = out.values.double().numpy()
    # |v - v'| <= s/2, up to one float32 rounding of q * s
    assert np.all(np.abs(v - w) <= per / 2 + np.abs(w) * 2.0**-24)
    # the scale is absmax / L: never below it (no clipping), and only rounding above it
    for b in range(s.size):
        absmax = np.abs(v[b * block_size : (b + 1) * block_size]).max()
        assert s[b] * L >= absmax * (1 - 2.0**-23)
        assert s[b] <= absmax / L * (1 + 2.0**-9) + 2.0**-24
    # and the values section is as small as the scheme's bits allow
    h, _ = split(data)
    assert h.val_len == -(-v.size * {127: 8, 7: 4, 1: 2}[L] // 8)


def test_edge_shapes_round_trip_empty_dense_and_single_entry():
    cases = [
        vector(0, [], []),
        vector(1, [], []),
        vector(1, [0], [3.5]),
        vector(5, [], []),
        vector(9, range(9), np.zeros(9)),
        vector(8, [7], [-1e-45]),
        vector(1000, [0, 999], [F32_MAX, -F32_MAX]),
    ]
    for vec in cases:
        for spec in (CodecSpec(), CodecSpec(positions="bitmap", zstd_level=5), CodecSpec(positions="gaps")):
            out = decode(encode(vec, spec), max_n=vec.n)
            assert_same_positions(out, vec)
            assert np.array_equal(bits_of(out.values), bits_of(vec.values))
        out = decode(encode(vec, CodecSpec(values="int8")), max_n=vec.n)
        assert_same_positions(out, vec)


def test_all_zero_values_quantize_to_zero_with_a_zero_scale():
    vec = vector(100, range(0, 100, 3), np.zeros(34))
    data = encode(vec, CodecSpec(values="int8", block_size=8))
    assert np.all(transmitted_scales(data)[0] == 0)
    assert torch.equal(decode(data, max_n=100).values, vec.values)


def test_huge_and_tiny_magnitudes_survive_int8_and_bf16_without_overflow():
    vec = vector(4, [0, 1, 2, 3], [F32_MAX, -F32_MAX, 1e-45, -3e38])
    out = decode(encode(vec, CodecSpec(values="int8", block_size=2)), max_n=4)
    assert torch.isfinite(out.values).all()
    assert (out.values.double() - vec.values.double()).abs().max() <= F32_MAX / 127 / 2 * 1.001
    vec = vector(3, [0, 1, 2], [3e38, -1e-40, 1e-45])
    out = decode(encode(vec, CodecSpec(values="bf16")), max_n=3)
    assert torch.isfinite(out.values).all()


def test_roundtrip_returns_the_bytes_and_exactly_what_the_receiver_decodes():
    vec = random_vector(5000, 1 / 16, seed=3)
    spec = CodecSpec(values="int8", block_size=64, zstd_level=3)
    data, seen = roundtrip(vec, spec)
    again = decode(data, max_n=5000)
    assert data == encode(vec, spec)
    assert torch.equal(seen.indices, again.indices) and torch.equal(seen.values, again.values)


def test_decoded_tensors_are_writable_and_own_their_memory():
    data = encode(random_vector(300, 0.1))
    out = decode(data, max_n=300)
    out.values.add_(1.0)
    out.indices.add_(0)
    assert out.values.numpy().flags.writeable


# --- overflow and bad input at encode ---------------------------------------------------------------------


def test_fp16_overflow_raises_at_encode_naming_fp16():
    with pytest.raises(ValueError, match="fp16"):
        encode(vector(3, [0, 2], [1.0, 70000.0]), CodecSpec(values="fp16"))
    # just below the rounding threshold is representable
    out = decode(encode(vector(3, [0, 2], [1.0, 65519.0]), CodecSpec(values="fp16")), max_n=3)
    assert out.values.tolist() == [1.0, 65504.0]


def test_bf16_overflow_at_the_float32_maximum_raises_at_encode():
    with pytest.raises(ValueError, match="bf16"):
        encode(vector(1, [0], [F32_MAX]), CodecSpec(values="bf16"))


def test_int8_fp16_scales_that_would_overflow_raise_at_encode():
    with pytest.raises(ValueError, match="fp16"):
        encode(vector(1, [0], [1e8]), CodecSpec(values="int8", scales="fp16"))


@pytest.mark.parametrize(
    "vec, match",
    [
        (vector(5, [3, 1], [1, 2]), "increasing"),
        (vector(5, [1, 1], [1, 2]), "increasing"),
        (vector(5, [1, 5], [1, 2]), r"\[0, n=5\)"),
        (vector(5, [-1, 2], [1, 2]), r"\[0, n=5\)"),
        (vector(5, [1, 2], [1, float("nan")]), "NaN"),
        (vector(5, [1, 2], [1, float("inf")]), "NaN or infinite"),
        (vector(1, [0, 0], [1, 2]), "k=2 positions for n=1"),
    ],
)
def test_encode_refuses_malformed_vectors(vec, match):
    with pytest.raises(ValueError, match=match):
        encode(vec)


@pytest.mark.parametrize(
    "spec, field",
    [
        (CodecSpec(values="fp8"), "values"),
        (CodecSpec(positions="elias"), "positions"),
        (CodecSpec(block_size=0), "block_size"),
        (CodecSpec(block_size=True), "block_size"),
        (CodecSpec(zstd_level=23), "zstd_level"),
        (CodecSpec(zstd_level=-1), "zstd_level"),
        (CodecSpec(scales="bf16"), "scales"),
    ],
)
def test_spec_validation_names_the_bad_field(spec, field):
    with pytest.raises(ValueError, match=f"CodecSpec.{field}"):
        spec.validate()
    with pytest.raises(ValueError, match=f"CodecSpec.{field}"):
        encode(vector(3, [1], [1.0]), spec)


# --- position cost ----------------------------------------------------------------------------------------


def test_bound_bits_is_log2_of_the_binomial_coefficient():
    for n, k in [(1, 0), (1, 1), (10, 3), (64, 32), (1000, 17), (3000, 2999)]:
        assert bound_bits(n, k) == pytest.approx(math.log2(math.comb(n, k)), abs=1e-6)
    with pytest.raises(ValueError):
        bound_bits(3, 4)


def test_dense_messages_spend_zero_bytes_on_positions():
    vec = SparseVector.from_dense(torch.randn(1000))
    for positions in ("auto", "bitmap", "gaps"):
        data = encode(vec, CodecSpec(positions=positions))
        h, body = split(data)
        assert h.positions == hdr.PositionScheme.DENSE and h.pos_len == 0 and len(body) == 4000


@pytest.mark.parametrize("inv_density", [2, 3, 4, 8, 32, 256])
def test_auto_picks_the_smaller_of_bitmap_and_gaps(inv_density):
    vec = random_vector(20000, 1 / inv_density, seed=inv_density)
    sizes = {p: len(encode(vec, CodecSpec(positions=p))) for p in ("auto", "bitmap", "gaps")}
    assert sizes["auto"] == min(sizes["bitmap"], sizes["gaps"])
    picked = split(encode(vec))[0].positions
    assert picked == (
        hdr.PositionScheme.BITMAP if sizes["bitmap"] <= sizes["gaps"] else hdr.PositionScheme.GOLOMB
    )


@pytest.mark.parametrize("inv_density", [8, 16, 64, 256, 1024])
def test_gap_code_is_within_five_percent_of_log2_binomial_for_density_at_most_one_eighth(inv_density):
    n = 200_000
    vec = random_vector(n, 1 / inv_density, seed=inv_density)
    h, _ = split(encode(vec, CodecSpec(positions="gaps")))
    assert h.pos_len * 8 <= 1.05 * bound_bits(n, vec.k)


def test_clustered_positions_still_round_trip_through_the_gap_code():
    idx = np.concatenate([np.arange(10, 500), np.arange(90_000, 90_050), [199_999]])
    vec = vector(200_000, idx, np.ones(idx.size))
    out = decode(encode(vec, CodecSpec(positions="gaps")), max_n=200_000)
    assert_same_positions(out, vec)


# --- header and strict decoding ---------------------------------------------------------------------------


def test_header_starts_with_magic_version_and_scheme_bytes():
    data = encode(random_vector(1000, 1 / 64), CodecSpec(values="int8", block_size=32))
    assert data[:4] == b"CLMC" and data[4] == 1
    assert data[5] == hdr.PositionScheme.GOLOMB and data[6] == hdr.ValueScheme.INT8
    h, body = split(data)
    assert (h.n, h.k, h.block_size) == (1000, 15, 32)
    assert h.body_len == len(body) == h.pos_len + h.scale_len + h.val_len
    assert len(data) - len(body) <= 24  # a compact header


def test_zstd_is_kept_only_where_it_makes_the_message_smaller():
    zeros = vector(10_000, range(0, 10_000, 2), np.zeros(5000))
    noise = vector(10_000, [5, 77], [1.2345, -6.789])  # a zstd frame's overhead exceeds any gain
    assert split(encode(zeros, CodecSpec(zstd_level=3)))[0].flags & hdr.FLAG_ZSTD
    assert not split(encode(noise, CodecSpec(zstd_level=3)))[0].flags & hdr.FLAG_ZSTD
    assert len(encode(noise, CodecSpec(zstd_level=3))) == len(encode(noise))


def test_decode_enforces_max_n_and_expected_n():
    data = encode(random_vector(1000, 0.1))
    with pytest.raises(CodecError, match="max_n"):
        decode(data, max_n=999)
    with pytest.raises(CodecError, match="expected n=1001"):
        decode(data, max_n=10_000, expected_n=1001)
    assert decode(data, max_n=1000, expected_n=1000).n == 1000


def test_bad_arguments_to_decode_are_plain_value_errors_not_codec_errors():
    data = encode(random_vector(10, 0.5))
    with pytest.raises(ValueError) as e:
        decode(data, max_n=-1)
    assert type(e.value) is ValueError
    with pytest.raises(CodecError, match="bytes"):
        decode("not bytes", max_n=10)


def test_decode_accepts_bytearray_and_memoryview():
    vec = random_vector(100, 0.2)
    data = encode(vec)
    for form in (bytearray(data), memoryview(data)):
        assert torch.equal(decode(form, max_n=100).indices, vec.indices)


def test_non_minimal_varints_are_rejected():
    data = encode(vector(5, [1], [1.0]))
    h, body = split(data)
    # n = 5 written as two bytes (0x85 0x00) instead of one, CRC fixed up
    tail = data[hdr.FIXED_SIZE :]
    assert tail[0] == 5
    forged = data[: hdr.FIXED_SIZE] + bytes([0x85, 0x00]) + tail[1:]
    with pytest.raises(CodecError, match="minimally"):
        decode(reseal(forged), max_n=10)
    assert craft(h, body) == data
