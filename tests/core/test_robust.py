import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellm.core import robust
from cellm.core.aggregate import aggregate
from cellm.core.sparse import SparseVector


def sv(values, n=None, idx=None):
    v = torch.tensor(values, dtype=torch.float32)
    n = n or v.numel()
    i = torch.arange(v.numel(), dtype=torch.int64) if idx is None else torch.tensor(idx, dtype=torch.int64)
    return SparseVector(n, i, v)


def test_the_lower_median_of_two_uploads_is_the_smaller_one():
    assert robust.lower_median([5.0, 1e30]) == 5.0
    assert robust.lower_median([3.0, 1.0, 2.0]) == 2.0
    assert robust.lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0


def test_the_bound_uses_this_round_and_the_history_and_is_capped_by_max_norm():
    assert robust.clip_bound([1.0, 1e30], [], factor=3.0) == 3.0
    assert robust.clip_bound([1e30], [1.0, 1.0, 2.0], factor=3.0) == 3.0  # one upload: the history decides
    assert robust.clip_bound([1e30], [], factor=3.0, max_norm=0.5) == 0.5
    assert robust.clip_bound([1.0], [], factor=0.0) == math.inf


def test_clipping_scales_down_only_what_exceeds_the_bound():
    big, cut = robust.clip(sv([3.0, 4.0]), 1.0)
    assert cut and math.isclose(robust.norm(big), 1.0, rel_tol=1e-6)
    small, cut = robust.clip(sv([0.3, 0.4]), 1.0)
    assert not cut and torch.equal(small.values, torch.tensor([0.3, 0.4]))


@settings(max_examples=60, deadline=None)
@given(m=st.integers(2, 8), huge=st.floats(1e3, 1e35), seed=st.integers(0, 10_000))
def test_one_client_moves_the_mean_by_at_most_the_bound_over_m_whatever_it_sends(m, huge, seed):
    g = torch.Generator().manual_seed(seed)
    honest = [SparseVector.from_dense(torch.randn(50, generator=g) * 0.01) for _ in range(m - 1)]
    attacker = SparseVector.from_dense(torch.randn(50, generator=g) * huge)
    norms = [robust.norm(x) for x in (*honest, attacker)]
    bound = robust.clip_bound(norms, [], factor=3.0)
    clipped = [robust.clip(x, bound)[0] for x in (*honest, attacker)]
    with_attacker = aggregate(clipped)
    without = aggregate([*clipped[:-1], SparseVector(50, torch.zeros(0, dtype=torch.int64), torch.zeros(0))])
    moved = float(torch.linalg.vector_norm((with_attacker - without).double()))
    assert moved <= bound / m * (1 + 1e-5)
    assert bound <= 3.0 * max(norms[:-1]) * (1 + 1e-6)  # the bound itself comes from an honest norm


def test_the_trimmed_mean_cuts_each_coordinates_extremes():
    ds = [sv([1.0, 0.0]), sv([2.0, 0.0]), sv([3.0, 0.0]), sv([1e9, 5.0]), sv([-1e9, 0.0])]
    out = robust.trimmed_mean(ds, 0.2)
    assert torch.allclose(out, torch.tensor([2.0, 0.0]))
    assert torch.allclose(robust.trimmed_mean(ds[:3], 0.0), aggregate(ds[:3]))


def test_the_coordinate_median_counts_unsent_entries_as_zero():
    ds = [sv([1.0], n=3, idx=[0]), sv([2.0], n=3, idx=[0]), sv([5.0, 7.0], n=3, idx=[0, 2])]
    assert torch.allclose(robust.coordinate_median(ds), torch.tensor([2.0, 0.0, 0.0]))
    even = [sv([1.0]), sv([3.0]), sv([10.0]), sv([-4.0])]
    assert torch.allclose(robust.coordinate_median(even), torch.tensor([2.0]))


def test_krum_picks_an_upload_from_the_honest_cluster():
    g = torch.Generator().manual_seed(0)
    honest = [SparseVector.from_dense(torch.ones(20) + 0.01 * torch.randn(20, generator=g)) for _ in range(4)]
    bad = SparseVector.from_dense(-50 * torch.ones(20))
    assert robust.krum_select([bad, *honest], byzantine=1) != 0
    assert torch.equal(robust.combine([bad, *honest], "krum"), honest[robust.krum_select([bad, *honest], 1) - 1]
                       .to_dense())


def test_an_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="unknown robust rule"):
        robust.combine([sv([1.0])], "mode")


def test_a_sign_flipped_upload_points_against_the_consensus_and_honest_ones_do_not():
    g = torch.Generator().manual_seed(1)
    common = torch.randn(40, generator=g)
    honest = [SparseVector.from_dense(common + 0.5 * torch.randn(40, generator=g)) for _ in range(4)]
    flipped = SparseVector.from_dense(-3 * honest[0].values)
    cos = robust.cosines_to_consensus([*honest, flipped])
    assert cos[-1] < 0 < min(cos[:-1])
