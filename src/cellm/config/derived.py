"""What the other layers read off a config: the files' spec, the task, the model's label, the clients to load,
and the config with the number of clients its data loaded as."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cellm.config.schema import CellmConfig, DataConfig
from cellm.data import DATASETS, FileSpec, clients_to_load
from cellm.errors import ConfigError


def file_spec(d: DataConfig) -> FileSpec:
    """The ``data.*`` fields a files dataset uses."""
    return FileSpec(path=d.path, test_path=d.test_path, text_column=d.text_column, label_column=d.label_column,
                    prompt_column=d.prompt_column, response_column=d.response_column,
                    messages_column=d.messages_column, client_column=d.client_column, partition=d.partition,
                    holdout=d.holdout, shards_per_client=d.shards_per_client)


def model_label(cfg: CellmConfig) -> str:
    """What to call the model in folder names and plots: the registered name, or model.path's last part."""
    return Path(cfg.model.path).expanduser().stem if cfg.model.path else cfg.model.name


def task_of(cfg: CellmConfig) -> str:
    """classification or causal_lm: the packaged dataset's, or what the named columns of the files make."""
    if cfg.data.name == "files":
        return file_spec(cfg.data).task
    return str(DATASETS[cfg.data.name].task)


def known_clients(cfg: CellmConfig) -> int | None:
    """The number of clients the data will load as, when the config alone tells it: data.num_clients, or what 0
    (auto) stands for; None where only loading tells (0 with a natural partition of files: every usable client)."""
    d = cfg.data
    n = clients_to_load(d.name, d.num_clients, file_spec(d) if d.name == "files" else None)
    return n or None


def with_clients(cfg: CellmConfig, n: int) -> CellmConfig:
    """``cfg`` with ``data.num_clients = n``, the number of clients its data loaded as (``FederatedData.num_clients``).

    What 0 (auto) resolved to is written back so that the run folder's config, a resume, Flower nodes and the
    metrics all see the number; loading with ``n`` gives the same clients, rows and order as loading with 0. A
    config that already names ``n`` comes back as it is; one that names another number is a bug (ValueError).
    """
    d = cfg.data
    if d.num_clients == n:
        return cfg
    if n < 1 or d.num_clients != 0:
        raise ValueError(f"data.num_clients = {d.num_clients} cannot become {n}: only 0 (auto) resolves, to >= 1")
    if cfg.fl.clients_per_round > n:
        raise ConfigError(f"config field 'fl.clients_per_round' = {cfg.fl.clients_per_round} but the data has only "
                          f"{n} clients; lower it")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, num_clients=n))
