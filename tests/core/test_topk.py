import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellm.core.topk import num_kept, sparsify, topk_indices, topk_mask

vectors = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=300)
dens = st.floats(min_value=1e-3, max_value=1.0, exclude_min=False)


@given(vectors, dens)
@settings(max_examples=200, deadline=None)
def test_topk_keeps_exactly_floor_n_d_entries_of_largest_magnitude(xs, d):
    x = torch.tensor(xs, dtype=torch.float32)
    mask = topk_mask(x, d)
    k = num_kept(x.numel(), d)
    assert k == (x.numel() if d == 1.0 else max(1, math.floor(x.numel() * d)))
    assert int(mask.sum()) == k
    if 0 < k < x.numel():
        assert x.abs()[mask].min() >= x.abs()[~mask].max()


def test_topk_breaks_ties_toward_the_lower_position():
    x = torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5])
    assert topk_indices(x, 2).tolist() == [1, 2]
    assert topk_indices(x, 3).tolist() == [1, 2, 3]


def test_topk_is_one_selection_over_all_tensors_not_per_tensor():
    a, b = torch.tensor([10.0, 9.0, 8.0]), torch.tensor([0.1, 0.2, 0.3])
    mask = topk_mask(torch.cat([a, b]), 0.5)
    assert mask.tolist() == [True, True, True, False, False, False]


def test_sparsify_at_density_one_is_the_dense_vector():
    x = torch.tensor([0.0, 1.0, -2.0])
    sv = sparsify(x, 1.0)
    assert sv.is_dense and torch.equal(sv.to_dense(), x)


def test_masked_start_equals_w_times_m():
    torch.manual_seed(0)
    w = torch.randn(1000)
    m = topk_mask(w, 0.25)
    sv = sparsify(w, 0.25)
    assert torch.equal(sv.to_dense(), w * m)
