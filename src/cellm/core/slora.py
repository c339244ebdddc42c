"""SLoRA's two pure pieces (Babakniya et al., 2023): the fixed random subset that stage 1 trains, and the switch
that turns stage 1's sparse change of each target matrix into a LoRA initialisation by truncated SVD.

The subset is drawn from the run seed alone, so server and clients agree on it without a byte sent; only the
subset's values travel in stage 1.
"""

from __future__ import annotations

import numpy as np
import torch

from cellm.core.topk import num_kept

SUBSET_STREAM = 11


def subset_indices(numel: int, density: float, seed: int, module: int) -> torch.Tensor:
    """Sorted positions (into the flattened matrix) of module ``module``'s stage-1 subset: ``floor(numel *
    density)`` distinct entries (at least 1), uniformly at random from (seed, module)."""
    k = num_kept(numel, density)
    rng = np.random.default_rng(np.random.SeedSequence([seed, module, SUBSET_STREAM]))
    idx = rng.choice(numel, size=k, replace=False)
    return torch.from_numpy(np.sort(idx).astype(np.int64))


def scatter_delta(values: torch.Tensor, idx: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense change ΔW of one matrix: ``values`` at the subset positions ``idx``, zero elsewhere."""
    out = torch.zeros(shape[0] * shape[1], dtype=torch.float32)
    out[idx] = values.to(torch.float32)
    return out.view(shape)


def svd_lora_init(delta: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A [r, in], B [out, r]) with ``scaling * B @ A`` = the best rank-r approximation of ``delta``.

    From the truncated SVD ΔW ≈ U_r S_r V_rᵀ: B = U_r sqrt(S_r / scaling), A = sqrt(S_r / scaling) V_rᵀ, so the
    singular values are split evenly between the factors and LoRA's alpha / r scaling is divided out. A rank
    above min(out, in) leaves the extra rows of A and columns of B at zero.
    """
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    r = min(rank, s.numel())
    root = torch.sqrt(s[:r] / scaling)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a[:r] = root[:, None] * vh[:r]
    b[:, :r] = u[:, :r] * root[None, :]
    return a.to(torch.float32), b.to(torch.float32)
