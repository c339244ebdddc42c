"""The Python API: ``cellm.run(config) -> RunResult``, the same engine as ``cellm run``."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path
from typing import Any

import torch

from cellm.config import CellmConfig, load_config, validate
from cellm.errors import ConfigError
from cellm.federated.client import ClientState
from cellm.federated.server import ServerState
from cellm.models.evaluate import primary_metric
from cellm.runtime import runfolder as rf
from cellm.runtime.driver import enter_next_stage
from cellm.runtime.embedded import Simulator, simulate
from cellm.runtime.record import RunRecorder, RunResult, check_new_folder, default_out_dir, new_run_folder
from cellm.runtime.setup import Setup, load_setup
from cellm.runtime.threads import pin_threads, using_threads

__all__ = ["RunResult", "resume", "run"]


def _as_config(config: CellmConfig | dict | str | Path | None) -> CellmConfig:
    if config is None:
        return load_config()
    if isinstance(config, CellmConfig):
        validate(config)
        return config
    if isinstance(config, dict):
        return load_config(data=config)
    return load_config(config)


def run(config: CellmConfig | dict | str | Path | None = None, out: str | Path | None = None, *,
        progress: bool = False, save: bool = True) -> RunResult:
    """Run a federated fine-tuning job; with ``save`` it writes a run folder (default runs/<model>-<data>-<time>).

    Everything that can fail on bad input (config, assets, an existing folder) fails before the folder exists.
    The run uses ``run.threads`` torch threads (resolved here when 0, and recorded in the folder's config);
    the caller's own thread count is restored afterwards.
    """
    cfg = pin_threads(_as_config(config))
    out_dir = Path(out) if out is not None else (default_out_dir(cfg) if save else None)
    check_new_folder(out_dir)
    with using_threads(cfg.run.threads):
        setup = load_setup(cfg)  # AssetError / ConfigError surface here, before any file is written
        with new_run_folder(out_dir, cfg):
            return _execute(cfg, setup, out_dir, progress)


def _execute(cfg: CellmConfig, setup: Setup, out_dir: Path | None, progress: bool,
             checkpoint: dict[str, Any] | None = None) -> RunResult:
    metric, _ = primary_metric(setup.loaded.task)
    rec = RunRecorder(cfg, out_dir, metric, progress)
    sim = Simulator(cfg, setup)
    state = None
    if checkpoint is not None:
        state = ServerState.from_state_dict(checkpoint["server"])
        if state.stage == 2:  # SLoRA past its switch: w0 is the SVD start, not the seeded init; load stage 2
            enter_next_stage(setup, state, cfg)
        elif state.w0 is None:  # a checkpoint written before w0 was kept
            state.w0 = setup.w0.clone()
        elif not torch.equal(state.w0, setup.w0):
            raise ConfigError("cannot resume: the initial adapter rebuilt from the config differs from the "
                              "checkpoint's (another torch build or model files)")
        sim.client_states = {int(c): ClientState(**v) for c, v in checkpoint["clients"].items()}
        if rec.bar is not None:
            rec.bar.n = state.round

    def on_round(st: ServerState, row: dict[str, Any]) -> None:
        rec.on_round(st, row)
        every = cfg.run.checkpoint_every
        if out_dir is not None and every and (st.round % every == 0 or st.round == cfg.rounds):
            rf.save_checkpoint(out_dir, {
                "format": 1, "config": cfg.to_toml(), "server": st.state_dict(),
                "clients": {str(c): {"residual": v.residual, "copy": v.copy} for c, v in sim.client_states.items()},
            })

    try:
        state = simulate(cfg, setup, state=state, on_round=on_round, sim=sim)
    finally:
        rec.close()
    return rec.finish(state, setup)


def resume(out: str | Path, *, progress: bool = False) -> RunResult:
    """Continue the run in ``out`` from its last checkpoint; the result equals an uninterrupted run's.

    The run keeps the thread count recorded in its config.toml, whatever the environment says now.
    """
    out_dir = Path(out)
    if not (out_dir / rf.CHECKPOINT).exists():
        raise ConfigError(f"cannot resume: {out_dir / rf.CHECKPOINT} not found (run.checkpoint_every = 0, "
                          "or the run stopped before its first checkpoint)")
    cfg = load_config(out_dir / rf.CONFIG)
    try:
        ckpt = rf.load_checkpoint(out_dir)
    except Exception as exc:  # a torn or foreign file: say which
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
                      "threads (the resumed rounds are exact only if the run started with as many)", stacklevel=2)
    with using_threads(cfg.run.threads):
        setup = load_setup(cfg)
        return _execute(cfg, setup, out_dir, progress, checkpoint=ckpt)
