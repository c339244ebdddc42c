"""Robust aggregation: bound what any one upload can do to the global model, then combine.

A hostile client may send any values that decode. Two lines of defence, both pure functions over decoded sparse
deltas (an entry a client did not send counts as 0, as in FLASC's mean):

1. A per-upload L2 bound, on by default: every upload is scaled down to at most ``factor`` times the *lower*
   median norm of a reference set (this round's uploads plus the clipped norms of the last few rounds). The lower
   median of two uploads is the smaller one, so the bound holds from two uploads on; a huge upload is cut to a
   few honest norms, and after the mean its share of the step is at most ``bound / m``.
2. A robust combiner in place of the mean: the coordinate-wise trimmed mean and median (Yin et al. 2018) or Krum
   (Blanchard et al. 2017), as Flower's FedTrimmedAvg, FedMedian and Krum strategies offer for dense updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cellm.core.sparse import SparseVector

RULES = ("mean", "trimmed_mean", "median", "krum")


def norm(sv: SparseVector) -> float:
    return float(torch.linalg.vector_norm(sv.values.to(torch.float64)))


def lower_median(xs: Sequence[float]) -> float:
    """The lower of the two middle values for an even count (the smaller one of two)."""
    if not xs:
        raise ValueError("lower_median needs at least one value")
    s = sorted(xs)
    return s[(len(s) - 1) // 2]


def clip_bound(norms: Sequence[float], history: Sequence[float], factor: float, max_norm: float = 0.0) -> float:
    """The L2 bound of this round's uploads: ``factor`` x the lower median of ``norms`` and ``history`` (0 = no
    relative bound), capped by ``max_norm`` when it is > 0; ``inf`` when neither applies."""
    bound = math.inf
    ref = [x for x in (*norms, *history) if math.isfinite(x)]
    if factor > 0 and ref:
        bound = factor * lower_median(ref)
    if max_norm > 0:
        bound = min(bound, max_norm)
    return bound


def clip(sv: SparseVector, bound: float) -> tuple[SparseVector, bool]:
    """``sv`` scaled down to L2 norm <= ``bound``; (the result, whether it was scaled)."""
    n = norm(sv)
    if not n > bound:  # also False for n == 0 and bound == inf
        return sv, False
    scaled = (sv.values.to(torch.float64) * (bound / n)).to(torch.float32)
    return SparseVector(sv.n, sv.indices, scaled), True


def _stack(deltas: Sequence[SparseVector]) -> torch.Tensor:
    n = deltas[0].n
    if any(d.n != n for d in deltas):
        raise ValueError("all deltas must have the same length N")
    out = torch.zeros(len(deltas), n, dtype=torch.float32)
    for i, d in enumerate(deltas):
        out[i, d.indices] = d.values.to(torch.float32)
    return out


def trimmed_mean(deltas: Sequence[SparseVector], trim: float) -> torch.Tensor:
    """Per coordinate: drop the floor(trim * m) largest and smallest of the m values, average the rest."""
    if not deltas:
        raise ValueError("trimmed_mean needs at least one delta")
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    m = len(deltas)
    cut = int(math.floor(trim * m))
    x, _ = torch.sort(_stack(deltas), dim=0)
    return x[cut:m - cut].to(torch.float64).mean(dim=0).to(torch.float32)


def coordinate_median(deltas: Sequence[SparseVector]) -> torch.Tensor:
    """Per coordinate median of the m values (the mean of the two middle ones for even m)."""
    if not deltas:
        raise ValueError("coordinate_median needs at least one delta")
    m = len(deltas)
    x, _ = torch.sort(_stack(deltas), dim=0)
    lo, hi = (m - 1) // 2, m // 2
    return ((x[lo].to(torch.float64) + x[hi].to(torch.float64)) / 2).to(torch.float32)


def krum_select(deltas: Sequence[SparseVector], byzantine: int) -> int:
    """Krum: the index of the upload whose summed squared distance to its m - f - 2 nearest others is smallest
    (at least one neighbour is scored when m is small)."""
    if not deltas:
        raise ValueError("krum needs at least one delta")
    m = len(deltas)
    if m == 1:
        return 0
    x = _stack(deltas).to(torch.float64)
    d2 = torch.cdist(x, x).pow(2)
    near = max(1, min(m - 1, m - byzantine - 2))
    scores = []
    for i in range(m):
        others = torch.cat([d2[i, :i], d2[i, i + 1:]])
        scores.append(float(torch.sort(others).values[:near].sum()))
    return min(range(m), key=lambda i: (scores[i], i))


def combine(deltas: Sequence[SparseVector], rule: str, *, trim: float = 0.2, byzantine: int = 1) -> torch.Tensor:
    """The robust rules' pseudo-gradient (the plain mean lives in :mod:`cellm.core.aggregate`)."""
    if rule == "trimmed_mean":
        return trimmed_mean(deltas, trim)
    if rule == "median":
        return coordinate_median(deltas)
    if rule == "krum":
        return deltas[krum_select(deltas, byzantine)].to_dense()
    raise ValueError(f"unknown robust rule {rule!r}; one of {', '.join(RULES[1:])}")


def cosines_to_consensus(deltas: Sequence[SparseVector], trim: float = 0.2) -> list[float]:
    """Each upload's cosine similarity to the round's coordinate-wise trimmed mean (the consensus direction: a
    coordinate counts only where at least two uploads agree beyond the trimmed ends). A sign-flipped upload
    points against it; an honest one along it or across it. 0 for an all-zero upload or consensus."""
    ref = trimmed_mean(deltas, trim).to(torch.float64)
    rn = float(torch.linalg.vector_norm(ref))
    out = []
    for d in deltas:
        dn = norm(d)
        if rn == 0.0 or dn == 0.0:
            out.append(0.0)
            continue
        out.append(float((ref[d.indices] * d.values.to(torch.float64)).sum()) / (rn * dn))
    return out
