"""Federated datasets for cellm: pip-installed corpora (no network) or the user's own files, cached tokenized.

``load_federated`` is the one entry point: it serves the cache when it can and otherwise reads, splits and
tokenizes the named dataset (``files``: the user's, described by a :class:`FileSpec`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cellm.data.bbc import load_bbc
from cellm.data.cache import load_or_build
from cellm.data.chitchat import load_chitchat
from cellm.data.errors import DataConfigError
from cellm.data.files import FILES_FORMAT, FileSpec, file_digest, label_names, load_files
from cellm.data.partition import subsample
from cellm.data.shakespeare import load_shakespeare
from cellm.data.types import FederatedData, Split
from cellm.errors import ConfigError


@dataclass(frozen=True)
class DatasetSpec:
    """A packaged dataset: what a model must be to train on it (known before anything is loaded) and its loader."""

    task: str | None  # "classification" or "causal_lm"; None: decided by the columns named (files)
    num_labels: int | None  # a classifier's head size; None for language modelling (or read from the files)
    loader: Callable[..., FederatedData] | None


def _lm(loader: Callable[..., FederatedData]) -> Callable[..., FederatedData]:
    def load(tokenizer: Any, *, dirichlet_alpha: float, test_fraction: float, **kw: Any) -> FederatedData:
        del dirichlet_alpha, test_fraction  # bbc-only settings
        return loader(tokenizer, **kw)

    return load


DATASETS: dict[str, DatasetSpec] = {  # the one registry of datasets, as MODELS is of models
    "bbc": DatasetSpec("classification", 5, load_bbc),
    "shakespeare": DatasetSpec("causal_lm", None, _lm(load_shakespeare)),
    "chitchat": DatasetSpec("causal_lm", None, _lm(load_chitchat)),
    "files": DatasetSpec(None, None, None),  # the user's files: see cellm.data.files
}

DEFAULT_CLIENTS = 50
"""What ``data.num_clients = 0`` (auto) loads where the data does not name its clients: the packaged datasets (50
was their default before 0 meant auto, so their splits stay as they were) and the iid, dirichlet and shard
partitions of files."""

__all__ = ["DATASETS", "DEFAULT_CLIENTS", "DataConfigError", "DatasetSpec", "FederatedData", "FileSpec", "Split",
           "clients_to_load", "label_names", "load_federated"]


def clients_to_load(name: str, num_clients: int, files: FileSpec | None = None) -> int:
    """The number of clients to load for ``data.num_clients``: itself when > 0; for 0 (auto), 0 = every usable
    client with a natural partition of files (``files``), else :data:`DEFAULT_CLIENTS`."""
    if num_clients:
        return num_clients
    if name == "files" and files is not None and files.partition_kind == "natural":
        return 0
    return DEFAULT_CLIENTS


def load_federated(
    name: str,
    tokenizer: Any,
    tokenizer_id: str,
    *,
    num_clients: int,
    seq_len: int,
    min_client_size: int,
    dirichlet_alpha: float = 0.5,
    test_fraction: float = 0.2,
    max_test_examples: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    files: FileSpec | None = None,
    labels: list[str] | None = None,
) -> FederatedData:
    """The federated split of dataset ``name`` (one of DATASETS), tokenized with ``tokenizer``.

    ``tokenizer`` is a Hugging Face tokenizer with ``pad_token`` set; ``tokenizer_id`` names it in the
    cache key (it must change whenever the tokenizer does). ``dirichlet_alpha`` and ``test_fraction`` apply
    to bbc only; the language-modelling datasets hold out a fixed share of speakers/senders instead.
    ``max_test_examples`` (None or 0: no cap) keeps a seed-determined subset of the test split.
    ``cache_dir`` None disables the on-disk cache. The settings' ranges are the config's
    (:func:`cellm.config.validate`); they are not checked again here. ``name = "files"`` reads ``files`` (a
    classifier's ``labels`` from :func:`label_names`); its cache key holds the files' content digests.
    ``num_clients = 0`` is auto (:func:`clients_to_load`); the result's ``num_clients`` is the number loaded, and
    loading with that number gives the same data.
    """
    if name not in DATASETS:
        raise ConfigError(f"config field 'data.name' must be one of {', '.join(DATASETS)}; got {name!r}")
    auto = num_clients == 0
    num_clients = clients_to_load(name, num_clients, files)  # the key of an auto default is its number's
    cap = max_test_examples or None
    bbc = name == "bbc"
    fields = {  # everything that changes the result; bbc-only settings are None elsewhere (no needless misses)
        "dataset": name,
        "tokenizer": tokenizer_id,
        "seq_len": seq_len,
        "num_clients": num_clients,
        "min_client_size": min_client_size,
        "dirichlet_alpha": float(dirichlet_alpha) if bbc else None,
        "test_fraction": float(test_fraction) if bbc else None,
        "seed": seed,
        "max_test_examples": cap,
    }

    if name == "files":
        if files is None:
            raise ConfigError("config field 'data.path' is needed with data.name = 'files'")
        fields.update(asdict(files), files_format=FILES_FORMAT, dirichlet_alpha=float(dirichlet_alpha),
                      test_fraction=float(test_fraction),
                      labels=labels, path=file_digest(files.path, "data.path"),  # content, not location
                      test_path=file_digest(files.test_path, "data.test_path") if files.test_path else None)

    def build() -> FederatedData:
        try:
            return split()
        except DataConfigError as exc:
            if auto and num_clients:  # the message names the number; say where it came from
                raise DataConfigError(f"{exc} (data.num_clients = 0 is auto: {num_clients} here)") from None
            raise

    def split() -> FederatedData:
        if name == "files":
            data = load_files(files, tokenizer, labels=labels, num_clients=num_clients, seq_len=seq_len,
                              min_client_size=min_client_size, dirichlet_alpha=dirichlet_alpha,
                              test_fraction=test_fraction, seed=seed)
        else:
            data = DATASETS[name].loader(tokenizer, num_clients=num_clients, seq_len=seq_len,
                                         min_client_size=min_client_size, dirichlet_alpha=dirichlet_alpha,
                                         test_fraction=test_fraction, seed=seed)
        # Separate stream from the split's, so capping never changes which examples the clients get.
        keep = subsample(len(data.test), cap, np.random.default_rng([seed, 1]))
        if len(keep) < len(data.test):
            data.test = data.test.subset(keep)
        return data

    return load_or_build(cache_dir, name, fields, build)
