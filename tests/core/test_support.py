"""Shared upload supports (comm.up_support): the rules, the values-only wire format, error feedback, the checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellm.core.codec import CodecError, CodecSpec, decode, encode
from cellm.core.codec.header import PositionScheme, unpack
from cellm.core.feedback import compress, compress_on
from cellm.core.sparse import SparseVector
from cellm.core.support import (
    fill_random,
    fill_scored,
    head_mask,
    one_for_all,
    random_order,
    shared_support,
    support_indices,
)
from cellm.core.topk import num_kept
from cellm.federated.server import check_upload


def test_the_seeded_order_is_a_permutation_pinned_across_machines():
    order = random_order(1000, 7)
    assert sorted(order.tolist()) == list(range(1000))
    # PCG64's raw outputs are defined bit for bit, so the order is a constant of the seed: pinned here
    assert random_order(10, 0).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert not torch.equal(random_order(1000, 8), order)


@given(st.integers(1, 3000), st.sampled_from([1.0, 0.5, 1 / 16, 1e-3]), st.integers(0, 2**40))
@settings(max_examples=40, deadline=None)
def test_a_random_support_has_the_upload_densitys_size_and_is_the_same_for_the_same_seed(n, d, seed):
    s = shared_support("random", n, d, seed=seed)
    assert int(s.sum()) == num_kept(n, d)
    assert torch.equal(s, shared_support("random", n, d, seed=seed))


def test_random_supports_are_nested_in_their_budget():
    empty = torch.zeros(500, dtype=torch.bool)
    small, large = fill_random(empty, 20, 3), fill_random(empty, 100, 3)
    assert int(small.sum()) == 20 and int(large.sum()) == 100 and bool(large[small].all())


def test_download_plus_random_keeps_the_download_and_tops_it_up_to_the_upload_density():
    n = 1000
    download = torch.zeros(n, dtype=torch.bool)
    download[:30] = True
    s = shared_support("download+random", n, 0.1, seed=1, download=download)
    assert bool(s[download].all()) and int(s.sum()) == 100
    assert torch.equal(shared_support("download", n, 0.1, seed=1, download=download), download)
    big = torch.ones(n, dtype=torch.bool)
    big[::3] = False  # a download larger than the budget is kept whole, nothing added
    assert torch.equal(shared_support("download+random", n, 0.1, seed=1, download=big), big)
    assert bool(shared_support("download", n, 0.1, seed=1).all())  # a dense download: everything


def test_the_head_is_added_to_any_shared_support_and_counts_toward_the_random_budget():
    segments = [("m.layer.lora_A.default.weight", 0, 40), ("m.layer.lora_B.default.weight", 40, 80),
                ("m.classifier.modules_to_save.default.weight", 80, 95),
                ("m.classifier.modules_to_save.default.bias", 95, 100)]
    head = head_mask(segments, 100)
    assert head.nonzero().reshape(-1).tolist() == list(range(80, 100))
    s = shared_support("random", 100, 0.5, seed=0, head=head)
    assert bool(s[head].all()) and int(s.sum()) == 50
    assert not bool(head_mask(segments[:2], 100).any())
    with pytest.raises(ValueError, match="outside"):
        head_mask([("x.modules_to_save.w", 90, 101)], 100)
    with pytest.raises(ValueError, match="chosen by each client"):
        shared_support("topk", 100, 0.5, seed=0)


@pytest.mark.parametrize("values", ["fp32", "fp16", "int8", "int4", "int2"])
@pytest.mark.parametrize("zstd", [0, 3])
def test_a_shared_support_upload_carries_no_position_bytes(values, zstd):
    n = 4000
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    x[:7] = 0.0  # zeros inside S are sent too: every client's message has the same length
    support = support_indices(shared_support("random", n, 0.25, seed=5) | (torch.arange(n) < 7))
    spec = CodecSpec(values=values, zstd_level=zstd)
    payload, received, _ = compress_on(x, support, spec)
    h, off, _ = unpack(memoryview(payload))
    assert h.positions == PositionScheme.DENSE and h.pos_len == 0 and h.n == h.k == support.numel()
    if not zstd:  # header + values (and the codec's block scales), nothing else
        assert len(payload) == off + h.scale_len + h.val_len
    assert received.n == n and torch.equal(received.indices, support)
    assert torch.equal(decode(payload, max_n=support.numel(), expected_n=support.numel()).values, received.values)
    if values == "fp32":
        assert torch.equal(received.values, x[support])


@given(st.integers(1, 500), st.sampled_from(["fp32", "int8", "int4", "int2"]), st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_error_feedback_keeps_what_falls_outside_the_support_and_the_quantization_error(n, values, seed):
    g = torch.Generator().manual_seed(seed)
    x, old = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1
    support = support_indices(shared_support("random", n, 0.3, seed=seed))
    _, sent, new = compress_on(x, support, CodecSpec(values=values), residual=old)
    outside = torch.ones(n, dtype=torch.bool)
    outside[support] = False
    assert torch.equal(new[outside], (x + old)[outside])  # outside S: kept whole, for a later round
    assert torch.allclose(sent.to_dense() + new, x + old, atol=1e-6)  # nothing lost, only delayed


def test_the_server_scatters_a_values_only_upload_into_the_support_and_refuses_any_other_length():
    n = 300
    support = support_indices(shared_support("random", n, 0.2, seed=2))
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    payload, _, _ = compress_on(x, support, CodecSpec())
    sv = check_upload(payload, n, shared=support)
    assert sv.n == n and torch.equal(sv.indices, support) and torch.equal(sv.values, x[support])
    shorter, _, _ = compress_on(x, support[:-1], CodecSpec())
    with pytest.raises(CodecError, match="expected n"):
        check_upload(shorter, n, shared=support)
    with pytest.raises(CodecError, match="exceeds max_n"):
        check_upload(payload, n, shared=support[1:])
    topk, _, _ = compress(x, 0.2, CodecSpec())  # a per-client top-k message over all N in place of values only
    with pytest.raises(CodecError, match="exceeds max_n"):
        check_upload(topk, n, shared=support)
    sparse = encode(SparseVector(support.numel(), torch.tensor([0, 3]), torch.tensor([1.0, 2.0])))
    with pytest.raises(CodecError, match="all .* values of the support"):
        check_upload(sparse, n, shared=support)


def test_only_a_support_every_client_of_the_round_derives_alike_counts_as_one_for_all():
    assert one_for_all("random", per_client_downloads=True, tiers=False)
    assert one_for_all("download+random", per_client_downloads=False, tiers=False)
    assert not one_for_all("download", per_client_downloads=True, tiers=False)  # delta downloads differ per client
    assert not one_for_all("random", per_client_downloads=False, tiers=True)  # each tier its own density or rank
    assert not one_for_all("topk", per_client_downloads=False, tiers=False)


def test_the_server_fills_by_score_and_falls_back_to_the_seeded_order_without_one():
    fixed = torch.zeros(10, dtype=torch.bool)
    fixed[0] = True
    scores = torch.tensor([9.0, 0.1, -5.0, 0.2, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert fill_scored(fixed, 3, scores, seed=0).nonzero().reshape(-1).tolist() == [0, 2, 4]  # |score|, not score
    assert torch.equal(fill_scored(fixed, 4, None, seed=0), fill_random(fixed, 4, seed=0))
    with pytest.raises(ValueError, match="scores"):
        fill_scored(fixed, 4, torch.zeros(9), seed=0)
