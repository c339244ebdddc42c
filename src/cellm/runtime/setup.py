"""The loaded pieces of a run: the one base model with its adapter, the adapter's flat view, the data, and w0."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cellm.config import CellmConfig
from cellm.data import DATASETS, load_federated
from cellm.data.types import FederatedData
from cellm.models.flat import FlatView
from cellm.models.registry import MODELS, LoadedModel, load_model


@dataclass
class Setup:
    """Model (with adapter), its flat view, the federated data, and the seeded initial adapter."""

    loaded: LoadedModel  # the model with its adapter (a classifier or a causal LM), its tokenizer and task
    flat: FlatView
    data: FederatedData
    w0: torch.Tensor  # the seeded initial adapter, as built here: what init-relative downloads are relative to


def load_setup(cfg: CellmConfig) -> Setup:
    spec = MODELS[cfg.model.name]
    m, d = cfg.model, cfg.data
    num_labels = DATASETS[d.name].num_labels  # a classifier's head is sized by the dataset
    loaded = load_model(m.name, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                    target_modules=m.target_modules, num_labels=num_labels, seed=cfg.seed, freeze_a=m.freeze_a)
    data = load_federated(
        d.name, loaded.tokenizer, spec.tokenizer_id, num_clients=d.num_clients, seq_len=d.seq_len,
        min_client_size=d.min_client_size, dirichlet_alpha=d.dirichlet_alpha, test_fraction=d.test_fraction,
        max_test_examples=d.max_test_examples or None, seed=cfg.seed, cache_dir=d.cache_dir or None,
    )
    if data.num_labels != num_labels:
        raise ValueError(f"dataset {d.name} has {data.num_labels} classes, expected {num_labels}")
    flat = FlatView(loaded.model)
    return Setup(loaded, flat, data, flat.get())
