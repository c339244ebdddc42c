"""A run's checkpoint, written and read the same way by every runtime (embedded, Flower).

The checkpoint holds the server state (global vector, optimizer, ledger, metrics), the resolved config, a run
id that names this run to the nodes that keep client state for it, and the client state the runtime itself
holds (the embedded runtime keeps every client's; a Flower ServerApp keeps none: its nodes keep theirs on disk).
"""

from __future__ import annotations

import tomllib
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from cellm.config import CellmConfig, load_config
from cellm.errors import ConfigError
from cellm.federated.client import ClientState
from cellm.federated.server import ServerState
from cellm.runtime import runfolder as rf
from cellm.runtime import stages
from cellm.runtime.setup import Setup
from cellm.runtime.threads import pin_threads

FORMAT = 1


def new_run_id() -> str:
    return uuid.uuid4().hex


def due(cfg: CellmConfig, round_: int) -> bool:
    """Whether a checkpoint is written after ``round_`` (every run.checkpoint_every rounds, and the last)."""
    every = cfg.run.checkpoint_every
    return bool(every) and (round_ % every == 0 or round_ == cfg.rounds)


def save(out_dir: Path, cfg: CellmConfig, state: ServerState, run_id: str, runtime: str,
         clients: dict[int, ClientState] | None = None) -> None:
    """Write the checkpoint atomically (a crash mid-write leaves the previous one)."""
    rf.save_checkpoint(out_dir, {
        "format": FORMAT, "config": cfg.to_toml(), "server": state.state_dict(), "run_id": run_id,
        "runtime": runtime,
        "clients": {str(c): {"tensors": v.tensors(), "pending_round": v.pending_round}
                    for c, v in (clients or {}).items()},
    })


def read(out_dir: Path) -> tuple[CellmConfig, dict[str, Any]]:
    """The run folder's config and checkpoint, checked against each other; ConfigError says what is wrong."""
    out_dir = Path(out_dir)
    if rf.checkpoint_path(out_dir) is None:
        raise ConfigError(f"cannot resume: {out_dir / rf.CHECKPOINT} not found (run.checkpoint_every = 0, "
                          "or the run stopped before its first checkpoint)")
    cfg = load_config(out_dir / rf.CONFIG)
    try:
        ckpt = rf.load_checkpoint(out_dir)
    except rf.CheckpointError as exc:  # a pickle, torn or foreign file: the message names it
        raise ConfigError(f"cannot resume: {exc}") from None
    except Exception as exc:  # any other failure to read it: say which file
        raise ConfigError(f"cannot resume: checkpoint {out_dir / rf.CHECKPOINT} is unreadable ({exc})") from None
    try:
        same = load_config(data=tomllib.loads(str(ckpt.get("config")))) == cfg
    except (ConfigError, tomllib.TOMLDecodeError):
        same = False
    if not same:
        raise ConfigError(f"cannot resume: {out_dir / rf.CONFIG} differs from the config in the checkpoint")
    if cfg.run.threads < 1:  # a folder written before run.threads existed: the best guess is this shell's
        cfg = pin_threads(cfg)
        warnings.warn(f"{out_dir / rf.CONFIG} records no thread count; resuming with {cfg.run.threads} torch "
                      "threads (the resumed rounds are exact only if the run started with as many)", stacklevel=3)
    return cfg, ckpt


def stateful_clients(cfg: CellmConfig) -> bool:
    """Whether clients keep state between rounds (upload error feedback, delta-mode copies)."""
    return cfg.comm.error_feedback_up or cfg.comm.download_mode == "delta"


def run_id_of(ckpt: dict[str, Any] | None) -> str:
    """The id that names a run to the nodes keeping its clients' state: the checkpoint's, else a new one (a new
    run, or a checkpoint written before runs had ids)."""
    rid = None if ckpt is None else ckpt.get("run_id")
    return str(rid) if isinstance(rid, str) and rid else new_run_id()


def restore(ckpt: dict[str, Any], setup: Setup, cfg: CellmConfig,
            runtime: str) -> tuple[ServerState, dict[int, ClientState]]:
    """(server state, the clients' state kept by the runtime) from a checkpoint, with ``setup`` (freshly
    loaded from the config) brought to the checkpoint's stage. A run written by another runtime resumes; if its
    clients' state was kept elsewhere (a Flower run's, on its nodes), a warning says it restarts from zero."""
    written_by = str(ckpt.get("runtime", "embedded"))
    if written_by != runtime and written_by == "flower" and stateful_clients(cfg):
        warnings.warn(f"this run's clients kept their state (error-feedback residuals, delta-mode copies) on its "
                      f"Flower nodes; resuming it {runtime} restarts that state from zero, so the resumed rounds "
                      "differ from an uninterrupted run", stacklevel=3)
    where = "cannot resume: the checkpoint's"
    try:
        state = ServerState.from_state_dict(ckpt["server"])
        clients = {int(c): ClientState.from_tensors(dict(v["tensors"]), int(v["pending_round"]))
                   for c, v in ckpt.get("clients", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where} server or client state is malformed ({type(exc).__name__}: {exc})") from None
    if not (isinstance(state.w, torch.Tensor) and state.w.dtype == torch.float32 and state.w.dim() == 1
            and bool(torch.isfinite(state.w).all())):
        raise ConfigError(f"{where} global adapter is not a finite float32 vector")
    if state.stage not in ((1, 2) if stages.first_stage(cfg) else (0,)):
        raise ConfigError(f"{where} stage {state.stage} is not a stage of this run")
    if state.stage == 2:  # SLoRA past its switch: w0 is the SVD start, not the seeded init; load stage 2
        stages.follow(setup, cfg, 2)
    elif state.w0 is None:  # a checkpoint written before w0 was kept
        state.w0 = setup.w0.clone()
    elif not torch.equal(state.w0, setup.w0):
        raise ConfigError("cannot resume: the initial adapter rebuilt from the config differs from the "
                          "checkpoint's (another torch build or model files)")
    if state.w.numel() != setup.flat.numel:
        raise ConfigError(f"{where} global adapter has {state.w.numel()} entries, the model's has "
                          f"{setup.flat.numel}")
    return state, clients
