"""Index-level splits of a labelled dataset: held-out test split and non-IID client partition.

Pure numpy on label arrays, so the splitting logic is testable on synthetic labels without any text or
tokenizer. All randomness comes from the ``rng`` argument: same generator state, same split.
"""

from __future__ import annotations

import numpy as np

from cellm.data.errors import DataConfigError

DIRICHLET_MAX_TRIES = 1000


def dirichlet_split(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
    max_tries: int = DIRICHLET_MAX_TRIES,
) -> list[np.ndarray]:
    """Partition example indices over clients with Dirichlet(alpha) label skew (Hsu et al., 2019).

    For each class, client shares are drawn from Dir(alpha, ..., alpha) and the class's shuffled indices are
    cut in those proportions; small alpha concentrates each class on few clients (non-IID), large alpha tends
    to an IID split. The whole draw is repeated until every client holds >= ``min_size`` examples.

    Returns one sorted int64 index array per client; every index 0..len(labels)-1 is in exactly one of them.
    Raises DataConfigError (a ValueError) if no valid draw is found in ``max_tries`` tries.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    n = len(labels)
    if num_clients * min_size > n:
        raise DataConfigError(
            f"cannot give num_clients={num_clients} clients min_size={min_size} examples each from only {n} "
            "examples; lower data.num_clients or data.min_client_size"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = _dirichlet(rng, alpha, num_clients)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(o) for o in out) >= min_size:
            return out
    raise DataConfigError(
        f"Dirichlet split (alpha={alpha}) found no draw giving each of num_clients={num_clients} clients "
        f"min_size={min_size} examples in {max_tries} tries ({n} examples); lower data.num_clients or "
        "data.min_client_size, or raise data.dirichlet_alpha"
    )


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    """Dir(alpha) sample that is always a proper distribution (tiny alphas can underflow to all zeros/NaN)."""
    p = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0:
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p / p.sum()


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test) keeping each class's share: round(test_fraction * class size) per class.

    Classes with at least two examples keep at least one on each side. Both arrays are sorted int64.
    """
    labels = np.asarray(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    empty = np.zeros(0, dtype=np.int64)
    return (
        np.sort(np.concatenate(train)).astype(np.int64) if train else empty,
        np.sort(np.concatenate(test)).astype(np.int64) if test else empty,
    )


def subsample(n: int, max_n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``max_n`` of ``n`` items drawn without replacement (all of them if max_n is
    None, 0 or >= n): a deterministic cap on evaluation cost."""
    if not max_n or max_n >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=max_n, replace=False)).astype(np.int64)
