"""The block position scheme (CodecSpec.pos_block): whole blocks named by block index, and a strict decoder."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from codec_fuzzing import check_decode, craft, reseal, split
from hypothesis import given, settings
from hypothesis import strategies as st

from cellm.core.codec import CodecError, CodecSpec, decode, encode
from cellm.core.codec import header as hdr
from cellm.core.codec.bitio import nbytes
from cellm.core.codec.positions import pack_block_param, unpack_block_param
from cellm.core.sparse import SparseVector
from cellm.core.topk import sparsify

BLOCKS = hdr.PositionScheme.BLOCKS


def block_vector(n, b, blocks, seed=0):
    """Every entry of the given blocks of the grid (the last one cut at n), random values."""
    idx = np.concatenate([np.arange(j * b, min((j + 1) * b, n)) for j in blocks]) if blocks else np.zeros(0)
    vals = np.random.default_rng(seed).standard_normal(idx.size)
    return SparseVector(n, torch.as_tensor(idx.astype(np.int64)), torch.as_tensor(vals.astype(np.float32)))


def rejects(data, match, max_n=1 << 20):
    with pytest.raises(CodecError, match=match) as e:
        decode(data, max_n=max_n)
    assert type(e.value) is CodecError  # a real rejection, not the last-resort guard


@given(st.integers(1, 3000), st.integers(2, 70), st.floats(1e-3, 1.0), st.sampled_from(["auto", "bitmap", "gaps"]),
       st.sampled_from(["fp32", "int4", "int8"]), st.integers(0, 2**31))
@settings(max_examples=150, deadline=None)
def test_block_top_k_messages_round_trip_and_name_each_block_once(n, b, d, positions, values, seed):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32))
    sv = sparsify(x, d, b)
    data = encode(sv, CodecSpec(values=values, positions=positions, pos_block=b))
    back = decode(data, max_n=n, expected_n=n)
    assert torch.equal(back.indices, sv.indices)
    if values == "fp32":
        assert torch.equal(back.values, sv.values)
    h, _ = split(data)
    if sv.k == n:
        assert h.positions == hdr.PositionScheme.DENSE and h.pos_len == 0
    else:
        assert h.positions == BLOCKS and unpack_block_param(h.pos_param)[0] == b
        nb = -(-n // b)
        assert h.pos_len <= nbytes(nb) or positions == "gaps"  # never more than a bitmap over the blocks
        if positions == "bitmap":
            assert unpack_block_param(h.pos_param)[1] == 0 and h.pos_len == nbytes(nb)


def test_block_positions_cost_about_one_bth_of_the_per_entry_code():
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(75_000).astype(np.float32))
    per_entry = split(encode(sparsify(x, 1 / 16), CodecSpec(values="int4")))[0].pos_len
    for b in (8, 16, 32):
        h, _ = split(encode(sparsify(x, 1 / 16, b), CodecSpec(values="int4", pos_block=b)))
        assert h.positions == BLOCKS
        assert h.pos_len <= nbytes(-(-75_000 // b))
        assert h.pos_len <= 2 * per_entry / b


def test_encode_refuses_positions_that_are_not_whole_blocks_naming_pos_block():
    vec = SparseVector(100, torch.tensor([0, 1, 2]), torch.ones(3))
    with pytest.raises(ValueError, match="pos_block=4"):
        encode(vec, CodecSpec(pos_block=4))
    encode(vec, CodecSpec(pos_block=3))  # [0, 3) is block 0 of the grid of 3


@pytest.mark.parametrize("bad", [0, 4097, True, 2.0])
def test_spec_refuses_a_pos_block_outside_1_to_4096(bad):
    with pytest.raises(ValueError, match="pos_block"):
        CodecSpec(pos_block=bad).validate()


def test_empty_and_short_last_block_messages_round_trip():
    for vec in (block_vector(10, 4, []), block_vector(10, 4, [2]), block_vector(10, 4, [0, 2]),
                block_vector(4097, 4096, [1]), block_vector(3, 4096, [])):
        for positions in ("auto", "bitmap", "gaps"):
            back = decode(encode(vec, CodecSpec(positions=positions, pos_block=4 if vec.n == 10 else 4096)),
                          max_n=1 << 20)
            assert torch.equal(back.indices, vec.indices)


def message(positions="bitmap", n=100, b=8, blocks=(1, 5, 12)):
    return split(encode(block_vector(n, b, list(blocks)), CodecSpec(positions=positions, pos_block=b)))


@pytest.mark.parametrize("positions", ["bitmap", "gaps"])
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda h: dict(pos_param=h.pos_param & ~0xFFF), "block size 1"),  # b = 1
        (lambda h: dict(pos_param=h.pos_param + 1), "k=|bitmap|golomb|cover"),  # b = 9: k=20 is not whole blocks
        (lambda h: dict(pos_param=h.pos_param + 2), "bitmap|golomb|cover"),  # b = 10: 2 blocks of 10
        (lambda h: dict(pos_param=pack_block_param(8, 1000)), "golomb parameter"),  # > n_blocks
        (lambda h: dict(k=h.k + 1), "value sections|whole blocks"),
        (lambda h: dict(k=h.k - 3, val_len=h.val_len - 12), "whole blocks"),  # 17 = 2 * 8 + 1: no such blocks
        (lambda h: dict(k=h.k - 4, val_len=h.val_len - 16), "codes|positions set"),  # 2 blocks, 3 named
        (lambda h: dict(k=h.k + 8, val_len=h.val_len + 32), "value sections|cover|bitmap|golomb"),
        (lambda h: dict(pos_len=h.pos_len + 1), "bitmap|golomb"),
        (lambda h: dict(n=h.n - 4), "cover|bitmap|golomb|past"),  # the last block shorter: k no longer adds up
    ],
)
def test_tampered_block_headers_are_refused_despite_a_correct_crc(positions, change, match):
    h, body = message(positions)
    new = replace(h, **change(h))
    if new.val_len != h.val_len:
        body = body + bytes(new.val_len - h.val_len) if new.val_len > h.val_len else body[: new.pos_len + new.val_len]
    rejects(craft(replace(new, body_len=len(body)), body), match)


def test_a_block_bitmap_with_an_extra_block_or_padding_bits_is_refused():
    h, body = message("bitmap")  # 13 blocks: 2 bytes, 3 padding bits
    assert h.pos_len == 2
    rejects(craft(h, bytes([body[0] | 0x80]) + body[1:]), "4 positions set")
    rejects(craft(h, body[:1] + bytes([body[1] | 1]) + body[2:]), "past position n")


def test_a_last_block_the_count_does_not_fit_is_refused():
    # n = 100, b = 8: the last block (12) has 4 entries. k = 20 says "two full blocks and the last"; name two full
    # blocks and a third full one instead.
    h, body = message("bitmap")
    other = encode(block_vector(100, 8, [1, 5, 11]), CodecSpec(positions="bitmap", pos_block=8))
    h2, body2 = split(other)
    rejects(craft(replace(h2, k=h.k, val_len=h.val_len, body_len=h.pos_len + h.val_len),
                  body2[: h.pos_len] + body[h.pos_len :]), "cover")


def test_block_gaps_that_run_past_the_last_block_are_refused():
    h, body = message("gaps", blocks=(1, 5, 12))
    rejects(craft(replace(h, n=h.n - 8, k=h.k), body), "past n|cover|golomb")


def test_every_truncation_and_scrambled_block_section_is_refused_or_valid():
    for positions in ("bitmap", "gaps"):
        data = encode(block_vector(1000, 16, [0, 3, 4, 40, 62]), CodecSpec(positions=positions, pos_block=16,
                                                                        values="int4"))
        for cut in range(len(data)):
            assert check_decode(data[:cut], 1 << 20) == "rejected"
        h, body = split(data)
        rng = np.random.default_rng(0)
        for _ in range(300):
            raw = bytearray(body)
            raw[int(rng.integers(0, h.pos_len))] = int(rng.integers(0, 256))
            assert check_decode(reseal(craft(h, bytes(raw))), 1 << 20) in ("ok", "rejected")


def test_the_golomb_parameter_and_block_size_share_pos_param_without_overlap():
    for b in (2, 17, 4096):
        for code in (0, 1, 5, 1 << 30):
            assert unpack_block_param(pack_block_param(b, code)) == (b, code)
