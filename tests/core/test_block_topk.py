"""Block top-k (comm.topk_block): whole blocks of b entries of one grid, ranked by L2 norm, ties to the lower block."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellm.core.codec import CodecSpec, decode
from cellm.core.codec import header as hdr
from cellm.core.feedback import compress, drop_zeros
from cellm.core.sparse import SparseVector
from cellm.core.topk import (
    block_norms,
    max_kept_entries,
    num_blocks,
    num_kept,
    sparsify,
    topk_indices,
    topk_mask,
    whole_blocks,
)

vectors = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=300)
dens = st.floats(min_value=1e-3, max_value=1.0)
blocks = st.integers(2, 40)


def blocks_of(mask: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-block count of kept entries, per-block length) over the grid."""
    n = mask.numel()
    nb = math.ceil(n / b)
    padded = torch.zeros(nb * b, dtype=torch.int64)
    padded[:n] = mask.to(torch.int64)
    lengths = torch.tensor([min(b, n - j * b) for j in range(nb)])
    return padded.view(nb, b).sum(1), lengths


@given(vectors, dens, blocks)
@settings(max_examples=200, deadline=None)
def test_block_topk_keeps_num_kept_whole_blocks_of_the_largest_l2_norm(xs, d, b):
    x = torch.tensor(xs, dtype=torch.float32)
    mask = topk_mask(x, d, b)
    kept, lengths = blocks_of(mask, b)
    assert bool(((kept == 0) | (kept == lengths)).all())  # every block whole or absent
    m = num_kept(num_blocks(x.numel(), b), d)
    assert int((kept > 0).sum()) == m
    assert int(mask.sum()) == int(lengths[kept > 0].sum()) <= max_kept_entries(x.numel(), d, b)
    norms = block_norms(x, b)
    if 0 < m < len(lengths):
        assert norms[kept > 0].min() >= norms[kept == 0].max()
    sv = sparsify(x, d, b)
    assert torch.equal(sv.to_dense(), torch.where(mask, x, torch.zeros_like(x)))
    assert whole_blocks(sv.indices, x.numel(), b)


def test_block_ties_go_to_the_lower_block_index():
    # blocks of 2: [3,4] norm 25, [0,5] 25, [5,0] 25, [1,1] 2 -> two of the three tied blocks: the first two
    x = torch.tensor([3.0, 4.0, 0.0, 5.0, 5.0, 0.0, 1.0, 1.0])
    assert topk_mask(x, 0.5, 2).tolist() == [True, True, True, True, False, False, False, False]
    assert sparsify(-x, 0.5, 2).indices.tolist() == [0, 1, 2, 3]


def test_a_short_last_block_competes_by_its_own_norm_and_is_cut_at_n():
    x = torch.tensor([0.1, 0.1, 0.1, 0.1, 9.0])  # blocks of 4: [0.1 x4] and the last block [9.0]
    sv = sparsify(x, 0.5, 4)  # num_kept(2 blocks, 1/2) = 1
    assert sv.indices.tolist() == [4] and sv.values.tolist() == [9.0]


@given(vectors, dens)
@settings(max_examples=100, deadline=None)
def test_block_one_is_the_per_entry_top_k_bit_for_bit(xs, d):
    x = torch.tensor(xs, dtype=torch.float32)
    idx = topk_indices(x, num_kept(x.numel(), d))
    assert torch.equal(topk_mask(x, d, 1), topk_mask(x, d))
    assert torch.equal(topk_mask(x, d).nonzero().reshape(-1), idx)
    if d < 1.0:
        assert torch.equal(sparsify(x, d, 1).indices, idx) and torch.equal(sparsify(x, d).indices, idx)
    assert max_kept_entries(x.numel(), d) == num_kept(x.numel(), d)


def test_whole_blocks_tells_a_union_of_grid_blocks_from_anything_else():
    n, b = 10, 4  # blocks [0,4), [4,8), [8,10)
    yes = ([], [0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [8, 9], list(range(10)))
    no = ([0, 1, 2], [1, 2, 3, 4], [8], [2, 3, 4, 5], [0, 1, 2, 3, 8])
    for idx in yes:
        assert whole_blocks(torch.tensor(idx, dtype=torch.int64), n, b), idx
    for idx in no:
        assert not whole_blocks(torch.tensor(idx, dtype=torch.int64), n, b), idx
    with pytest.raises(ValueError, match="block"):
        topk_mask(torch.ones(4), 0.5, 0)


def test_max_kept_entries_counts_whole_blocks_and_never_exceeds_n():
    assert max_kept_entries(75_000, 1 / 16, 16) == num_kept(4688, 1 / 16) * 16 == 293 * 16
    assert max_kept_entries(10, 1.0, 4) == 10
    assert max_kept_entries(10, 0.5, 4) == 4  # num_kept(3 blocks, 1/2) = 1 block


def test_dropping_zeros_in_block_mode_keeps_zeros_inside_a_kept_block_and_drops_all_zero_blocks():
    sv = SparseVector(8, torch.arange(8), torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]))
    assert drop_zeros(sv).indices.tolist() == [0, 7]
    kept = drop_zeros(sv, 2)
    assert kept.indices.tolist() == [0, 1, 6, 7] and kept.values.tolist() == [1.0, 0.0, 0.0, 2.0]


def test_compress_with_pos_block_sends_whole_blocks_named_by_block_index():
    torch.manual_seed(0)
    x = torch.randn(1000)
    x[:64] = 0.0  # zeros everywhere in the first blocks, and inside a kept block below
    x[100:116] = 50.0
    x[101] = 0.0
    spec = CodecSpec(values="int4", pos_block=16)
    payload, received, residual = compress(x, 1 / 8, spec, torch.zeros(1000))
    assert payload[5] == hdr.PositionScheme.BLOCKS
    assert whole_blocks(received.indices, 1000, 16) and 101 in received.indices.tolist()
    assert received.k == 16 * num_kept(num_blocks(1000, 16), 1 / 8)
    assert torch.equal(decode(payload, max_n=1000).indices, received.indices)
    assert torch.allclose(residual, x - received.to_dense())
    # an all-zero vector at density 1 (a round-1 init-relative download) sends no block at all
    payload, received, _ = compress(torch.zeros(1000), 1.0, spec)
    assert received.k == 0 and payload[5] == hdr.PositionScheme.BLOCKS
