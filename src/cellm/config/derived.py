"""What the other layers read off a config: the files' spec, the task, the model's label and a SLoRA stage's
config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cellm.config.schema import CellmConfig, DataConfig
from cellm.data import DATASETS, FileSpec


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


def stage_config(cfg: CellmConfig, stage: int) -> CellmConfig:
    """The config a round of ``stage`` runs under: SLoRA's stage 1 sends its whole subset (d = 1) at
    slora.codec both ways; stage 2 (and a one-stage run, stage 0) uses comm as configured."""
    if stage != 1:
        return cfg
    comm = dataclasses.replace(cfg.comm, down_density=1.0, up_density=1.0, down_decay=1.0, up_decay=1.0,
                               codec_down=cfg.slora.codec, codec_up=cfg.slora.codec, error_feedback_up=False,
                               client_freeze=False)
    return dataclasses.replace(cfg, comm=comm)
