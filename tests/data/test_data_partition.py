"""Index-level splitting: Dirichlet client partition, stratified test split, test-set cap."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cellm.data.errors import DataConfigError
from cellm.data.partition import dirichlet_split, stratified_split, subsample

label_arrays = arrays(np.int64, st.integers(1, 300), elements=st.integers(0, 6))
alphas = st.floats(0.01, 100.0)


@settings(max_examples=60, deadline=None)
@given(labels=label_arrays, num_clients=st.integers(1, 12), alpha=alphas, seed=st.integers(0, 2**32 - 1))
def test_dirichlet_split_assigns_every_example_exactly_once(labels, num_clients, alpha, seed):
    parts = dirichlet_split(labels, num_clients, alpha, 0, np.random.default_rng(seed))
    assert len(parts) == num_clients
    together = np.concatenate(parts)
    assert np.array_equal(np.sort(together), np.arange(len(labels)))


@settings(max_examples=40, deadline=None)
@given(labels=label_arrays, num_clients=st.integers(1, 8), alpha=st.floats(0.1, 100.0),
       min_size=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_dirichlet_split_never_returns_a_client_below_min_size(labels, num_clients, alpha, min_size, seed):
    try:
        parts = dirichlet_split(labels, num_clients, alpha, min_size, np.random.default_rng(seed), max_tries=50)
    except DataConfigError as exc:
        assert f"min_size={min_size}" in str(exc) and f"num_clients={num_clients}" in str(exc)
    else:
        assert min(len(p) for p in parts) >= min_size


def test_dirichlet_split_meets_a_feasible_min_size():
    labels = np.repeat(np.arange(5), 200)
    parts = dirichlet_split(labels, 20, 0.5, 10, np.random.default_rng(0))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_split_raises_a_value_error_naming_min_size_and_num_clients_when_impossible():
    with pytest.raises(ValueError, match=r"num_clients=10.*min_size=11"):
        dirichlet_split(np.zeros(100, dtype=np.int64), 10, 0.5, 11, np.random.default_rng(0))


def test_dirichlet_split_is_reproducible_from_the_generator_seed():
    labels = np.random.default_rng(1).integers(0, 5, size=500)
    a = dirichlet_split(labels, 7, 0.3, 2, np.random.default_rng(42))
    b = dirichlet_split(labels, 7, 0.3, 2, np.random.default_rng(42))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _mean_max_class_share(labels: np.ndarray, alpha: float) -> float:
    shares = []
    for seed in range(5):
        for part in dirichlet_split(labels, 10, alpha, 1, np.random.default_rng(seed)):
            shares.append(np.bincount(labels[part], minlength=5).max() / len(part))
    return float(np.mean(shares))


def test_small_alpha_concentrates_each_client_on_fewer_classes_than_large_alpha():
    labels = np.repeat(np.arange(5), 400)
    skewed, iid = _mean_max_class_share(labels, 0.1), _mean_max_class_share(labels, 100.0)
    assert skewed > 0.7  # most of a client's data is one class
    assert iid < 0.35  # close to the uniform 0.2
    assert skewed > iid + 0.3


@settings(max_examples=60, deadline=None)
@given(labels=arrays(np.int64, st.integers(2, 400), elements=st.integers(0, 4)),
       test_fraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1))
def test_stratified_split_is_disjoint_complete_and_keeps_class_proportions(labels, test_fraction, seed):
    train, test = stratified_split(labels, test_fraction, np.random.default_rng(seed))
    assert len(np.intersect1d(train, test)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    for c in np.unique(labels):
        n_c = int((labels == c).sum())
        in_test = int((labels[test] == c).sum())
        assert abs(in_test - test_fraction * n_c) <= 1  # rounding (and the one-each-side rule) only
        if n_c >= 2:
            assert 1 <= in_test <= n_c - 1


def test_subsample_caps_deterministically_and_keeps_everything_without_a_cap():
    a = subsample(100, 10, np.random.default_rng(3))
    assert len(a) == 10 and len(np.unique(a)) == 10 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, subsample(100, 10, np.random.default_rng(3)))
    assert np.array_equal(subsample(5, None, np.random.default_rng(0)), np.arange(5))
    assert np.array_equal(subsample(5, 0, np.random.default_rng(0)), np.arange(5))
    assert np.array_equal(subsample(5, 50, np.random.default_rng(0)), np.arange(5))
