import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from cellm.core.dp import clip, epsilon, private_mean
from cellm.core.sparse import SparseVector


def test_clipping_scales_a_delta_down_to_the_clip_norm_and_leaves_small_ones_alone():
    big = SparseVector(10, torch.tensor([1, 4]), torch.tensor([3.0, 4.0]))
    assert torch.linalg.vector_norm(clip(big, 1.0).values).item() == pytest.approx(1.0)
    small = SparseVector(10, torch.tensor([2]), torch.tensor([0.5]))
    assert torch.equal(clip(small, 1.0).values, small.values)


def test_gaussian_noise_of_the_stated_scale_is_added_to_every_coordinate():
    n, m, z, c = 200_000, 4, 1.5, 0.5
    zeros = [SparseVector(n, torch.empty(0, dtype=torch.int64), torch.empty(0)) for _ in range(m)]
    out = private_mean(zeros, c, z, torch.Generator().manual_seed(0))
    # (0 / C + N(0, z^2)) / m: std z / m everywhere, mean 0
    assert float(out.std()) == pytest.approx(z / m, rel=0.01)
    assert abs(float(out.mean())) < 5 * (z / m) / math.sqrt(n)
    assert int((out == 0).sum()) == 0


def test_the_noisy_mean_is_centred_on_the_clipped_mean_in_units_of_c():
    n, c = 50_000, 2.0
    d = SparseVector(n, torch.arange(n), torch.full((n,), 10.0))  # norm >> C: clipped to C
    out = private_mean([d, d], c, 0.5, torch.Generator().manual_seed(1))
    expected = (2 * c / math.sqrt(n)) / c / 2
    assert abs(float(out.mean()) - expected) < 5 * (0.5 / 2) / math.sqrt(n)  # 5 sigma of the noise's mean
    assert abs(float(out.mean())) > 2 * expected / 3


def test_epsilon_matches_the_opacus_rdp_accountant():
    acc = RDPAccountant()
    for _ in range(30):
        acc.step(noise_multiplier=1.1, sample_rate=0.1)
    assert epsilon(1.1, 0.1, 30, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert epsilon(1.1, 0.1, 0, 1e-5) == 0.0
    assert epsilon(1.1, 0.1, 60, 1e-5) > epsilon(1.1, 0.1, 30, 1e-5)
