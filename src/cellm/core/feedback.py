"""Error feedback: what top-k and quantization drop is kept as a residual and added to the next message.

Pure functions: the caller owns the residual (client-side for uploads, server-side per client for downloads).
"""

from __future__ import annotations

import torch

from cellm.core.codec import CodecSpec, roundtrip
from cellm.core.sparse import SparseVector
from cellm.core.topk import sparsify


def drop_zeros(sv: SparseVector, block: int = 1) -> SparseVector:
    """Exact zeros carry no information (e.g. LoRA B at init, frozen entries): they are not sent.

    ``block`` > 1 (block top-k): only blocks whose entries are all zero are left out, whole, so the kept set stays
    a union of blocks; a zero inside a block with a nonzero entry is sent.
    """
    nonzero = sv.values != 0
    if bool(nonzero.all()):
        return sv
    if block == 1:
        keep = nonzero
    else:
        bid = torch.div(sv.indices, block, rounding_mode="floor")
        keep = torch.isin(bid, bid[nonzero])
    return SparseVector(sv.n, sv.indices[keep], sv.values[keep])


def compress(
    x: torch.Tensor, density: float, spec: CodecSpec, residual: torch.Tensor | None = None,
    support: torch.Tensor | None = None,
) -> tuple[bytes, SparseVector, torch.Tensor | None]:
    """Top-k (at ``density``) of ``x + residual``, encoded; returns (payload, what the receiver decodes, new residual).

    ``support`` (a boolean mask) restricts the message to those positions (client_freeze): the top-k is taken
    among them only. At d = 1 the message is the smaller of the zero-dropped and the dense encoding (all N values,
    no position). ``spec.pos_block`` = b > 1 (comm.topk_block): the top-k keeps whole blocks of b entries, which
    the codec then names by block. The new residual is None when ``residual`` is None (no feedback kept).
    """
    target = x if residual is None else x + residual
    if support is not None:
        target = torch.where(support, target, torch.zeros_like(target))
    sv = drop_zeros(sparsify(target, density, spec.pos_block), spec.pos_block)
    payload, received = roundtrip(sv, spec)
    if density >= 1.0 and support is None and 0 < sv.k < sv.n:
        # a dense message may send its few zeros for less than their positions cost: the cheaper one goes
        dense_payload, dense_received = roundtrip(SparseVector.from_dense(target), spec)
        if len(dense_payload) < len(payload):
            payload, received = dense_payload, dense_received
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
