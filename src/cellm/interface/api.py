"""The Python API: ``cellm.run(config) -> RunResult``, the same engine as ``cellm run``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellm.config import CellmConfig, load_config, validate
from cellm.federated.server import ServerState
from cellm.models.evaluate import primary_metric
from cellm.runtime import checkpoint as ckpt
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
    state, run_id = None, ckpt.new_run_id()
    if checkpoint is not None:
        state, sim.client_states, run_id = ckpt.restore(checkpoint, setup, cfg, "embedded")
        if rec.bar is not None:
            rec.bar.n = state.round

    def on_round(st: ServerState, row: dict[str, Any]) -> None:
        rec.on_round(st, row)
        if out_dir is not None and ckpt.due(cfg, st.round):
            ckpt.save(out_dir, cfg, st, run_id, "embedded", sim.client_states)

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
    cfg, checkpoint = ckpt.read(out_dir)
    with using_threads(cfg.run.threads):
        setup = load_setup(cfg)
        return _execute(cfg, setup, out_dir, progress, checkpoint=checkpoint)
