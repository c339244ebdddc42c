"""Error feedback: what top-k and quantization drop is kept as a residual and added to the next message.

Pure functions: the caller owns the residual (client-side for uploads, server-side per client for downloads).
"""

from __future__ import annotations

import torch

from cellm.core.codec import CodecSpec, roundtrip
from cellm.core.sparse import SparseVector
from cellm.core.topk import sparsify


def drop_zeros(sv: SparseVector) -> SparseVector:
    """Exact zeros carry no information (e.g. LoRA B at init, frozen entries): they are not sent."""
    keep = sv.values != 0
    if bool(keep.all()):
        return sv
    return SparseVector(sv.n, sv.indices[keep], sv.values[keep])


def compress(
    x: torch.Tensor, density: float, spec: CodecSpec, residual: torch.Tensor | None = None,
    support: torch.Tensor | None = None,
) -> tuple[bytes, SparseVector, torch.Tensor | None]:
    """Top-k (at ``density``) of ``x + residual``, encoded; returns (payload, what the receiver decodes, new residual).

    ``support`` (a boolean mask) restricts the message to those positions (client_freeze): the top-k is taken
    among them only. The new residual is None when ``residual`` is None (no feedback kept).
    """
    target = x if residual is None else x + residual
    if support is not None:
        target = torch.where(support, target, torch.zeros_like(target))
    sv = drop_zeros(sparsify(target, density))
    payload, received = roundtrip(sv, spec)
    new_residual = None
    if residual is not None:
        new_residual = target - received.to_dense()
    return payload, received, new_residual


def compress_on(
    x: torch.Tensor, support: torch.Tensor, spec: CodecSpec, residual: torch.Tensor | None = None,
) -> tuple[bytes, SparseVector, torch.Tensor | None]:
    """The values of ``x + residual`` on a shared ``support`` (sorted int64 positions), encoded values only.

    The message is the dense vector of the |S| values in the support's order (the codec's zero-byte dense
    positions): the receiver knows S and scatters them back. Zeros inside S are sent, so every client's message of
    the round has the same length and order. Returns (payload, what the receiver decodes scattered over the N
    entries, new residual): error feedback keeps what falls outside S and the quantization error inside it.
    """
    target = x if residual is None else x + residual
    values = target.detach().reshape(-1).to(torch.float32)[support]
    payload, got = roundtrip(SparseVector(values.numel(), torch.arange(values.numel(), dtype=torch.int64), values),
                             spec)
    received = SparseVector(target.numel(), support, got.values)
    new_residual = None
    if residual is not None:
        new_residual = target - received.to_dense()
    return payload, received, new_residual
