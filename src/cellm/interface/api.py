"""The Python API: ``cellm.run(config) -> RunResult``, the same engine as ``cellm run``."""

from __future__ import annotations

from pathlib import Path

from cellm.config import CellmConfig, load_config, validate
from cellm.runtime.embedded import make_simulator
from cellm.runtime.record import RunResult, default_out_dir
from cellm.runtime.session import Session

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
    """Run a federated fine-tuning job in this process (the embedded runtime), as ``cellm run`` does.

    Everything that can fail on bad input (config, assets, an existing folder) fails before the folder exists.
    The run uses ``run.threads`` torch threads (resolved here when 0, and recorded in the folder's config); the
    caller's own thread count is restored afterwards.

    Args:
        config: The run's config: a `CellmConfig`, a dict shaped like the TOML file (merged
            over the defaults), the path of a TOML file, or None for the ``demo`` preset.
        out: The run folder to write (config.toml, metrics.jsonl, checkpoints, the adapter, summary and plot). It
            must not exist or be empty. None: ``runs/<model>-<data>-<time>`` when ``save``, else no folder.
        progress: Show a progress bar over the rounds.
        save: Write a run folder when ``out`` is None (False: keep everything in memory).

    Returns:
        The run's `RunResult`: its metrics rows, the final adapter's PEFT state dict, the bytes sent.

    Raises:
        ConfigError: A config field, a file or the run folder is unusable (the message names it).
        AssetError: A model's or dataset's files are missing or unreadable.
    """
    cfg = _as_config(config)
    out_dir = Path(out) if out is not None else (default_out_dir(cfg) if save else None)
    return Session.start(cfg, out_dir, progress=progress).run(make_simulator)


def resume(out: str | Path, *, progress: bool = False) -> RunResult:
    """Continue the run in ``out`` from its last checkpoint; the result equals an uninterrupted run's.

    The run keeps the config and thread count recorded in its ``config.toml``, whatever the environment says
    now.

    Args:
        out: The folder of a run that wrote checkpoints (``run.checkpoint_every`` > 0).
        progress: Show a progress bar over the remaining rounds.

    Returns:
        The completed run's `RunResult`, as if it had never stopped.

    Raises:
        ConfigError: No checkpoint, a checkpoint that does not match the folder's config, or one that is not a
            cellm checkpoint (never unpickled).
    """
    return Session.reopen(out, runtime="embedded", progress=progress).run(make_simulator)
