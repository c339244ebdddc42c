"""A run's stages, in one place. A one-stage run (stage 0) trains LoRA from the start; SLoRA (``slora.*``) first
trains a seeded sparse subset of the LoRA target matrices' own entries (stage 1), then switches to LoRA started
from the truncated SVD of that change (stage 2).

Everything a runtime needs to know about stages is here: which stage a run starts in and the trainable vector it
views (:func:`initial_view`), the config a round of a stage runs under (:func:`stage_config`), whether a stage
begins now (:func:`begins_now`), the server's switch (:func:`begin_next`), and bringing a freshly loaded model to
a stage (:func:`follow`: a resume, or a client told by its task). The model mechanics are
:mod:`cellm.models.stages`; the SVD is :mod:`cellm.core.slora`.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from cellm.config import CellmConfig
from cellm.errors import CellmError
from cellm.federated.server import ServerState
from cellm.models.flat import FlatView
from cellm.models.registry import LoadedModel
from cellm.models.stages import enter_stage1, enter_stage2


class StageError(CellmError):
    """A model cannot be brought to the stage asked for (SLoRA stages only go forward, 1 -> 2)."""


class Staged(Protocol):
    """What a stage switch changes: a loaded model's trainable view, its stage, and its initial vector w0
    (:class:`cellm.runtime.setup.Setup` is one)."""

    loaded: LoadedModel
    flat: FlatView
    w0: torch.Tensor
    stage: int


def first_stage(cfg: CellmConfig) -> int:
    """0 for a one-stage run, 1 for SLoRA."""
    return 1 if cfg.slora.stage1_rounds else 0


def initial_view(model: torch.nn.Module, cfg: CellmConfig) -> FlatView:
    """The trainable vector a run starts with: the adapter, or SLoRA stage 1's seeded subset (and the head)."""
    if first_stage(cfg) == 1:
        return enter_stage1(model, cfg.slora.density, cfg.seed)
    return FlatView(model)


def stage_config(cfg: CellmConfig, stage: int) -> CellmConfig:
    """The config a round of ``stage`` runs under: SLoRA's stage 1 sends its whole subset (d = 1) at
    slora.codec both ways; stage 2 (and a one-stage run, stage 0) uses comm as configured."""
    if stage != 1:
        return cfg
    comm = dataclasses.replace(cfg.comm, down_density=1.0, up_density=1.0, down_decay=1.0, up_decay=1.0,
                               codec_down=cfg.slora.codec, codec_up=cfg.slora.codec, error_feedback_up=False,
                               client_freeze=False)
    return dataclasses.replace(cfg, comm=comm)


def begins_now(state: ServerState, cfg: CellmConfig) -> bool:
    """Whether the next round starts a new stage: SLoRA once stage 1's rounds are done."""
    return state.stage == 1 and state.round >= cfg.slora.stage1_rounds


def _to_lora(staged: Staged, cfg: CellmConfig, *, from_svd: bool) -> float:
    staged.flat, kept = enter_stage2(staged.loaded.model, from_svd=from_svd, freeze_a=cfg.model.freeze_a)
    staged.stage = 2
    staged.w0 = staged.flat.get()
    return kept


def begin_next(staged: Staged, state: ServerState, cfg: CellmConfig) -> float:
    """The server's switch to stage 2: the global vector becomes LoRA initialised from the SVD of stage 1's
    change (plus the head as trained), with a fresh server optimizer. Returns the share of stage 1's change
    that the rank-r start keeps."""
    staged.flat.set(state.w)
    kept = _to_lora(staged, cfg, from_svd=True)
    state.w, state.w0 = staged.flat.get(), staged.w0.clone()
    state.opt_state, state.stage = None, 2
    return kept


def follow(staged: Staged, cfg: CellmConfig, stage: int) -> None:
    """Bring a model loaded from the config to ``stage`` without the SVD: the vector to train comes from the
    server (a client's download) or from a checkpoint (a resume). StageError if it cannot go there."""
    if stage == staged.stage:
        return
    if not (stage == 2 and staged.stage == 1):
        raise StageError(f"stage {stage} asked for, but this model is in stage {staged.stage}")
    _to_lora(staged, cfg, from_svd=False)
