"""Upload supports that every client of a round knows before it trains (``comm.up_support``).

Per-client top-k ("topk") lets each client choose where its upload lies, so the positions travel and differ from
client to client. A *shared* support S is fixed before training from what both sides already hold: the run seed
and the round (a seeded random set), the round's download positions (the mask M every client receives), the
classifier head, or entries the server chose and announced in the download. Uploads then carry only the values on S, in the same order for every client, so no position
bytes are sent and (for secure aggregation) masked vectors of the round can be added up.

Pure functions over flat tensors: the federated layer derives the seed and gathers the download positions.
"""

from __future__ import annotations

import numpy as np
import torch

from cellm.core.topk import num_kept

UP_SUPPORTS = ("topk", "random", "download", "download+random", "server")
"""The upload support rules: ``topk`` (each client's own top-k of its delta, positions sent), ``random`` (a seeded
random set, new each round), ``download`` (the round's download positions M), ``download+random`` (M topped up with
a seeded random set to the upload density: exploration), ``server`` (M topped up by the server with the entries of
largest score, e.g. its optimizer's first moment, and announced by sending them in the download)."""

SHARED_SUPPORTS = UP_SUPPORTS[1:]
"""The rules whose support is fixed before training: uploads carry values only."""

FILLED = ("random", "download+random")
"""The rules that top their fixed part up with seeded random positions to the upload density."""

USES_DOWNLOAD = ("download", "download+random", "server")
"""The rules built on the round's download positions (the download must then carry every position of M)."""

SERVER_CHOSEN = ("server",)
"""The rules whose extra entries the server picks from what only it knows and sends in the download (a client
takes the download's positions as they come)."""

HEAD_MARK = "modules_to_save"
"""What marks a classifier head's tensors in the adapter's names (peft's trainable copies of whole modules)."""


def is_shared(rule: str) -> bool:
    """Whether ``rule`` fixes the upload support before training (uploads carry values only)."""
    if rule not in UP_SUPPORTS:
        raise ValueError(f"unknown upload support rule {rule!r}; one of {', '.join(UP_SUPPORTS)}")
    return rule != "topk"


def one_for_all(rule: str, *, per_client_downloads: bool, tiers: bool) -> bool:
    """Whether ``rule`` gives every client of a round the same support (what secure aggregation needs).

    A random support is the round's; a download-based one is the download's, shared only when every client gets
    the same download (weights mode, not per-client delta downloads). Tiers (density or rank) give each tier its
    own support. Per-client top-k never shares one.
    """
    if not is_shared(rule) or tiers:
        return False
    return not (rule in USES_DOWNLOAD and per_client_downloads)


def head_mask(segments: list[tuple[str, int, int]], n: int) -> torch.Tensor:
    """Boolean mask of the classifier head's entries, from the adapter's (name, start, end) segments (a causal LM
    has no head: all False)."""
    mask = torch.zeros(n, dtype=torch.bool)
    for name, a, b in segments:
        if not 0 <= a <= b <= n:
            raise ValueError(f"segment {name!r} [{a}, {b}) lies outside a vector of {n} entries")
        if HEAD_MARK in name:
            mask[a:b] = True
    return mask


def random_order(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of range(n): positions sorted by PCG64's raw 64-bit outputs, which numpy defines bit
    for bit (unlike its shuffling methods), so every machine derives the same order from the same seed."""
    keys = np.random.PCG64(seed).random_raw(n)
    return torch.from_numpy(np.argsort(keys, kind="stable").astype(np.int64))


def fill_random(fixed: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``fixed`` (boolean) plus the first positions of the seeded order outside it, up to ``k`` in all (``fixed``
    alone when it already holds k or more). Nested in k: a smaller budget's set is inside a larger one's."""
    out = fixed.clone()
    need = k - int(fixed.sum())
    if need > 0:
        order = random_order(fixed.numel(), seed)
        out[order[~fixed[order]][:need]] = True
    return out


def fill_scored(fixed: torch.Tensor, k: int, scores: torch.Tensor | None, seed: int) -> torch.Tensor:
    """``fixed`` (boolean) plus the positions of largest ``|scores|`` outside it, up to ``k`` in all; equal scores
    (all of them when ``scores`` is None, before the server has any) go in the seeded order of ``seed``."""
    out = fixed.clone()
    need = k - int(fixed.sum())
    if need > 0:
        order = random_order(fixed.numel(), seed)
        order = order[~fixed[order]]
        if scores is not None:
            if scores.shape != fixed.shape:
                raise ValueError(f"scores must have {fixed.numel()} entries, got {tuple(scores.shape)}")
            order = order[torch.argsort(-scores.detach().abs().to(torch.float32)[order], stable=True)]
        out[order[:need]] = True
    return out


def shared_support(rule: str, n: int, density: float, *, seed: int, download: torch.Tensor | None = None,
                   head: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean support S (N entries) of a shared-support rule.

    ``download``: the round's download positions M (boolean; None = the whole vector, a dense download).
    ``head``: positions added to S whatever the rule (the classifier head). ``random`` and ``download+random`` fill
    the fixed part (head, and M) up to ``floor(N * density)`` entries with the seeded order of ``seed``; a fixed part
    already larger is kept whole. Client and server call this with the same inputs and get the same S.
    """
    if not is_shared(rule):
        raise ValueError(f"upload support rule {rule!r} is chosen by each client, not shared")
    fixed = torch.zeros(n, dtype=torch.bool)
    if head is not None:
        if head.shape != (n,) or head.dtype != torch.bool:
            raise ValueError(f"head must be a boolean vector of {n} entries")
        fixed |= head
    if rule in USES_DOWNLOAD:
        if download is None:
            fixed[:] = True
        else:
            if download.shape != (n,) or download.dtype != torch.bool:
                raise ValueError(f"download must be a boolean vector of {n} entries")
            fixed |= download
    if rule in FILLED:
        return fill_random(fixed, num_kept(n, density), seed)
    return fixed


def support_indices(mask: torch.Tensor) -> torch.Tensor:
    """The sorted int64 positions of a boolean support: the order of a values-only upload's entries."""
    return torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1).to(torch.int64)


__all__ = ["FILLED", "HEAD_MARK", "SERVER_CHOSEN", "SHARED_SUPPORTS", "USES_DOWNLOAD", "UP_SUPPORTS", "fill_random",
           "fill_scored", "head_mask", "is_shared", "one_for_all", "random_order", "shared_support", "support_indices"]
