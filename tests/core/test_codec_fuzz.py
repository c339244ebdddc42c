"""Strict decoding: mutated and crafted messages decode to a valid vector or raise CodecError, nothing else.

Crafted messages carry a correct CRC32 (fuzz.craft / fuzz.reseal), so the check under test -- not the checksum --
must reject them. The long run of the same mutator is bench/fuzz_codec.py.
"""

import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
import torch
import zstandard
from codec_fuzzing import MUTATIONS, check_decode, craft, fuzz_case, reseal, split

from cellm.core.codec import CodecError, CodecSpec, decode, encode
from cellm.core.codec import header as hdr
from cellm.core.codec import positions as pos_mod
from cellm.core.codec.errors import CodecInternalError
from cellm.core.sparse import SparseVector


def vector(n, idx, vals):
    return SparseVector(
        n, torch.as_tensor(np.asarray(idx, dtype=np.int64)), torch.as_tensor(np.asarray(vals, np.float32))
    )


def sample(n=1000, k=60, seed=0):
    rng = np.random.default_rng(seed)
    return vector(n, np.sort(rng.choice(n, k, replace=False)), rng.standard_normal(k))


def rejects(data, match, max_n=1 << 20):
    with pytest.raises(CodecError, match=match) as e:
        decode(data, max_n=max_n)
    assert type(e.value) is CodecError  # a real rejection, not the last-resort guard
    return e.value


def test_seeded_mutations_decode_to_valid_vectors_or_raise_codec_error():
    outcomes = {}
    for seed in range(600):
        name, outcome = fuzz_case(seed)
        outcomes.setdefault(outcome, []).append((seed, name))
    assert set(outcomes) <= {"ok", "rejected"}, {
        k: v[:5] for k, v in outcomes.items() if k not in ("ok", "rejected")
    }
    assert len(outcomes["rejected"]) > 400
    assert {name for _, name in outcomes["rejected"]} == set(MUTATIONS)


@pytest.mark.parametrize("values", ["rot4", "rot3", "rot2"])
def test_seeded_mutations_of_rotated_messages_decode_to_valid_vectors_or_raise_codec_error(values):
    outcomes = {}
    for seed in range(150):
        name, outcome = fuzz_case(seed, values=values)
        outcomes.setdefault(outcome, []).append((seed, name))
    assert set(outcomes) <= {"ok", "rejected"}, {
        k: v[:5] for k, v in outcomes.items() if k not in ("ok", "rejected")
    }
    assert len(outcomes["rejected"]) > 100


def test_every_truncation_is_rejected():
    for spec in (CodecSpec(), CodecSpec(values="int8", zstd_level=3), CodecSpec(positions="bitmap"),
                 CodecSpec(values="rot3", block_size=16)):
        data = encode(sample(), spec)
        for cut in range(len(data)):
            assert check_decode(data[:cut], 1 << 20) == "rejected"


def test_trailing_bytes_are_rejected_with_or_without_a_matching_crc():
    data = encode(sample())
    rejects(data + b"\0", "CRC|trailing")
    rejects(reseal(data + b"\0\1"), "truncated or trailing")


def test_flipped_bits_fail_the_checksum():
    data = bytearray(encode(sample()))
    data[-1] ^= 4
    rejects(bytes(data), "CRC32")


def test_bad_magic_version_flags_and_schemes_are_rejected():
    data = encode(sample())
    rejects(b"XXXX" + data[4:], "magic")
    rejects(data[:4] + b"\2" + data[5:], "version")
    h, body = split(data)
    rejects(craft(replace(h, flags=8), body), "flag")
    rejects(craft(replace(h, positions=7), body), "position scheme")
    rejects(craft(replace(h, values=9), body), "value scheme")


@pytest.mark.parametrize("n", [1 << 40, (1 << 62), (1 << 63) - 1])
def test_huge_declared_sizes_are_rejected_before_anything_is_allocated(n):
    h, body = split(encode(sample()))
    tracemalloc.start()
    try:
        rejects(craft(replace(h, n=n), body), "max_n")
        # within max_n, the sections that n implies do not fit the message: still rejected, still nothing allocated
        dense = replace(h, n=1 << 40, k=1 << 40, positions=0, pos_param=0, pos_len=0, val_len=4 << 40)
        rejects(craft(dense, body), "sections add up to 4398046511104", max_n=1 << 40)
        rejects(craft(replace(h, n=1 << 40, k=1 << 39), body), "golomb section|value sections", max_n=1 << 40)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k=2000), "exceeds n"),
        (dict(k=59), "value sections"),
        (dict(pos_len=1), "golomb section"),
        (dict(pos_param=0), "golomb parameter"),
        (dict(pos_param=5000), "golomb parameter"),
        (dict(val_len=4 * 61), "value sections"),
        (dict(scale_len=4), "value sections"),
        (dict(block_size=16), "block size"),
        (dict(body_len=1), "truncated or trailing"),
        (dict(flags=hdr.FLAG_FP16_SCALES), "fp16-scales"),
        (dict(positions=hdr.PositionScheme.DENSE, pos_param=0), "dense"),
    ],
)
def test_wrong_declared_sizes_and_fields_are_rejected_despite_a_correct_crc(change, match):
    h, body = split(encode(sample(), CodecSpec(positions="gaps")))
    rejects(craft(replace(h, **change), body), match)


def test_bitmap_for_a_dense_message_is_rejected_as_non_canonical():
    vec = SparseVector.from_dense(torch.ones(16))
    h, body = split(encode(vec))
    bitmap = b"\xff\xff"
    rejects(craft(replace(h, positions=1, pos_len=2, body_len=len(body) + 2), bitmap + body), "dense")


def poison(data, offset_in_values, raw):
    h, body = split(data)
    start = h.pos_len + h.scale_len + offset_in_values
    return craft(h, body[:start] + raw + body[start + len(raw) :])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("values, dtype", [("fp32", "<f4"), ("fp16", "<f2")])
def test_nan_and_inf_values_are_rejected_behind_a_correct_crc(bad, values, dtype):
    data = encode(sample(), CodecSpec(values=values))
    rejects(poison(data, np.dtype(dtype).itemsize * 7, np.array([bad], dtype).tobytes()), "NaN or infinite")


def test_bf16_nan_and_int8_out_of_range_values_are_rejected():
    rejects(poison(encode(sample(), CodecSpec(values="bf16")), 2, b"\xc0\x7f"), "NaN or infinite")
    rejects(poison(encode(sample(), CodecSpec(values="int8")), 3, b"\x80"), r"\[-127, 127\]")


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_bad_int8_scales_are_rejected(bad):
    data = encode(sample(), CodecSpec(values="int8", block_size=16))
    h, body = split(data)
    s = h.pos_len + 4
    rejects(craft(h, body[:s] + np.array([bad], "<f4").tobytes() + body[s + 4 :]), "scales")


def test_int8_scales_so_large_that_values_overflow_are_rejected():
    data = encode(sample(), CodecSpec(values="int8", block_size=1000))
    h, body = split(data)
    rejects(
        craft(h, body[: h.pos_len] + np.array([3e38], "<f4").tobytes() + body[h.pos_len + 4 :]), "infinite"
    )


def test_gap_codes_that_run_past_n_are_rejected():
    vec = vector(100, [10, 20, 99], [1, 2, 3])
    h, body = split(encode(vec, CodecSpec(positions="gaps")))
    rejects(craft(replace(h, n=99), body), "past n")


def test_bitmaps_with_the_wrong_count_or_bits_past_n_are_rejected():
    vec = vector(13, [0, 5, 9], [1, 2, 3])
    h, body = split(encode(vec, CodecSpec(positions="bitmap")))
    rejects(craft(h, bytes([body[0] | 1]) + body[1:]), "3|4 positions")
    rejects(craft(h, body[:1] + bytes([body[1] | 1]) + body[2:]), "past position n")


def test_positions_the_codes_cannot_express_are_still_caught_if_a_stage_produced_them(monkeypatch):
    """Gaps are >= 0 and a bitmap is a set, so unsorted or repeated positions cannot be written; the pipeline's
    final check guards against a stage bug producing them anyway."""
    data = encode(vector(100, [3, 40, 41], [1, 2, 3]), CodecSpec(positions="gaps"))
    stage = pos_mod.POSITION_STAGES[hdr.PositionScheme.GOLOMB]
    for wrong in ([3, 41, 40], [3, 40, 40]):
        monkeypatch.setattr(stage, "decode", lambda *a, w=wrong: np.array(w, dtype=np.int64))
        rejects(data, "strictly increasing")


def test_an_unexpected_internal_error_still_surfaces_as_a_codec_error(monkeypatch):
    data = encode(sample(), CodecSpec(positions="gaps"))
    stage = pos_mod.POSITION_STAGES[hdr.PositionScheme.GOLOMB]
    monkeypatch.setattr(stage, "decode", lambda *a: [][1])
    with pytest.raises(CodecInternalError, match="IndexError"):
        decode(data, max_n=1000)


def zstd_message(frame, base=None):
    h, _ = split(encode(base or vector(1000, range(0, 1000, 2), np.zeros(500))))
    return craft(replace(h, flags=h.flags | hdr.FLAG_ZSTD, body_len=len(frame)), frame)


def test_zstd_bombs_are_rejected_before_decompression():
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(1 << 26))  # 64 MiB of zeros
    assert len(bomb) < 4096
    tracemalloc.start()
    try:
        rejects(zstd_message(bomb), "declares 67108864 bytes")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_zstd_frames_without_size_with_extra_frames_or_not_smaller_are_rejected():
    h, raw = split(encode(vector(1000, range(0, 1000, 2), np.zeros(500))))
    assert not h.flags & hdr.FLAG_ZSTD
    rejects(zstd_message(zstandard.ZstdCompressor(write_content_size=False).compress(raw)), "declares -1")
    frame = zstandard.ZstdCompressor().compress(raw)
    rejects(zstd_message(frame + frame), "corrupt")
    rejects(zstd_message(frame[:-2]), "corrupt")
    rejects(zstd_message(raw[:100]), "zstd frame header unreadable")
    big = zstandard.ZstdCompressor(level=1).compress(
        bytes(np.random.default_rng(0).integers(0, 256, 2000, np.uint8))
    )
    h2, _ = split(encode(vector(10, [1], [1.0])))
    rejects(craft(replace(h2, flags=hdr.FLAG_ZSTD, body_len=len(big)), big), "must be smaller")


def test_a_message_decoded_from_zstd_matches_the_one_sent():
    vec = vector(1000, range(0, 1000, 2), np.zeros(500))
    data = encode(vec, CodecSpec(zstd_level=19))
    assert split(data)[0].flags & hdr.FLAG_ZSTD
    assert torch.equal(decode(data, max_n=1000).indices, vec.indices)


@pytest.mark.parametrize("values, bits", [("int4", 4), ("int2", 2)])
def test_packed_codes_above_their_range_are_rejected(values, bits):
    data = encode(sample(), CodecSpec(values=values))
    all_ones = bytes([0xFF])  # every code in the byte is 2^bits - 1 > 2L
    rejects(poison(data, 1, all_ones), r"codes must be in \[0, ")


@pytest.mark.parametrize("values, bits", [("int4", 4), ("int2", 2)])
def test_packed_values_with_nonzero_padding_bits_are_rejected(values, bits):
    per = 8 // bits
    k = 5  # leaves padding in the last byte for both widths
    vec = SparseVector(50, torch.arange(0, 50, 10), torch.linspace(-1, 1, k))
    data = encode(vec, CodecSpec(values=values))
    h, body = split(data)
    last = h.pos_len + h.scale_len + h.val_len - 1
    assert k % per
    padded = bytes([body[last] | (1 << (bits * (k % per)))])
    rejects(craft(h, body[:last] + padded + body[last + 1 :]), "padding")
