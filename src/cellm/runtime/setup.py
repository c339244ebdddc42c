"""The loaded pieces of a run: the one base model with its adapter, the adapter's flat view, the data, and w0."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cellm.config import CellmConfig, file_spec, task_of
from cellm.data import DATASETS, label_names, load_federated
from cellm.data.types import FederatedData
from cellm.errors import ConfigError
from cellm.models.device import check_precision, resolve_device
from cellm.models.flat import FlatView
from cellm.models.registry import LoadedModel, load_model, resolve_spec
from cellm.runtime.stages import first_stage, initial_view


@dataclass
class Setup:
    """Model (with adapter), its flat view, the federated data, and the seeded initial adapter."""

    loaded: LoadedModel  # the model with its adapter (a classifier or a causal LM), its tokenizer and task
    flat: FlatView
    data: FederatedData
    w0: torch.Tensor  # the seeded initial adapter, as built here: what init-relative downloads are relative to
    stage: int = 0  # which trainable vector ``flat`` views: 0 one-stage run; SLoRA 1 (sparse subset), 2 (LoRA)
    load_s: dict[str, float] = field(default_factory=dict)  # seconds spent loading: model, data


def load_setup(cfg: CellmConfig) -> Setup:
    """Build everything a run needs from its config; every bad input fails here, before any file is written.

    The adapter is initialised on CPU (so w0 is the same wherever the model then trains) and the model moved to
    ``run.device`` afterwards.
    """
    m, d = cfg.model, cfg.data
    device = resolve_device(cfg.run.device)
    check_precision(cfg.run.precision, device)
    task = task_of(cfg)
    files = file_spec(d) if d.name == "files" else None
    labels = label_names(files) if files is not None and task == "classification" else None
    num_labels = len(labels) if labels else DATASETS[d.name].num_labels  # a classifier's head fits the data
    t0 = time.perf_counter()
    spec = resolve_spec(m.name, m.path, task)
    loaded = load_model(spec, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                        target_modules=m.target_modules, num_labels=num_labels, seed=cfg.seed, freeze_a=m.freeze_a,
                        cache_dir=d.cache_dir or None, adapter=m.adapter, vera_rank=m.vera_rank)
    t1 = time.perf_counter()
    data = load_federated(
        d.name, loaded.tokenizer, spec.tokenizer_id, num_clients=d.num_clients, seq_len=d.seq_len,
        min_client_size=d.min_client_size, dirichlet_alpha=d.dirichlet_alpha, test_fraction=d.test_fraction,
        max_test_examples=d.max_test_examples or None, seed=cfg.seed, cache_dir=d.cache_dir or None,
        files=files, labels=labels,
    )
    t2 = time.perf_counter()
    if data.num_labels != num_labels:
        raise ValueError(f"dataset {d.name} has {data.num_labels} classes, expected {num_labels}")
    if data.num_clients < cfg.fl.clients_per_round:
        raise ConfigError(f"config field 'fl.clients_per_round' = {cfg.fl.clients_per_round} but the data has only "
                          f"{data.num_clients} clients; lower it")
    flat = initial_view(loaded.model, cfg)
    w0 = flat.get()
    loaded.model.to(device)
    return Setup(loaded, flat, data, w0, first_stage(cfg), {"model_s": t1 - t0, "data_s": t2 - t1})
