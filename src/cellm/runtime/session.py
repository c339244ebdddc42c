"""One run, from its start (or its resume) to its result, in any runtime.

A session pins the run's torch threads, loads the model and data, makes the run folder (or reopens it and
restores the checkpoint), records rounds, writes checkpoints, drives the rounds and finishes the folder. The
runtimes differ only in the :class:`SessionRunner` that executes clients: the embedded
:class:`~cellm.runtime.embedded.Simulator` (``cellm.run``, ``cellm.resume``) and the Flower ServerApp's
strategy (``cellm flower run`` / ``sim``). Everything that can fail on bad input fails before the folder exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cellm.config import CellmConfig, known_clients, with_clients
from cellm.errors import ConfigError
from cellm.federated.client import ClientState
from cellm.federated.server import ServerState
from cellm.models.evaluate import primary_metric
from cellm.runtime import checkpoint as ckpt
from cellm.runtime.driver import ClientRunner, drive
from cellm.runtime.record import RunRecorder, RunResult, check_new_folder, new_run_folder
from cellm.runtime.setup import Setup, load_setup
from cellm.runtime.threads import pin_threads, using_threads

_LOG = logging.getLogger("cellm")


class SessionRunner(ClientRunner, Protocol):
    """A runtime's way of running clients, with the hooks a session calls around the rounds."""

    runtime: str  # the runtime's name in checkpoints: "embedded" or "flower"
    connects: bool  # whether :meth:`connect` waits on other machines (then the model loads meanwhile)

    def connect(self) -> None:
        """Before the first round, while the server's model loads (Flower: set up the nodes)."""

    def attach(self, setup: Setup, clients: dict[int, ClientState]) -> None:
        """The loaded setup, and the clients' state restored from the checkpoint (a resume of this runtime)."""

    def kept_clients(self) -> dict[int, ClientState]:
        """The clients' state this runtime keeps itself, to checkpoint (none when clients keep their own)."""

    def on_row(self, row: dict[str, Any]) -> None:
        """A metrics row before it is recorded: the runtime may add its own columns."""

    def checkpointed(self, round_: int) -> None:
        """A checkpoint of ``round_`` was written."""

    def close(self) -> None:
        """The run completed and its folder is final."""


def _resolved_like(cfg: CellmConfig, saved: CellmConfig) -> CellmConfig:
    """``cfg`` with its auto client count (0) read as the number the saved run resolved it to."""
    try:
        return with_clients(cfg, saved.data.num_clients)
    except (ValueError, ConfigError):
        return cfg


MakeRunner = Callable[[CellmConfig, str, int], SessionRunner]  # (config, run id, round resumed from) -> runner


@dataclass
class Session:
    """A run to start (:meth:`start`) or to resume (:meth:`reopen`); :meth:`run` runs it."""

    cfg: CellmConfig
    out_dir: Path | None
    checkpoint: dict[str, Any] | None = None
    progress: bool = False
    logger: logging.Logger = field(default=_LOG, repr=False)

    @classmethod
    def start(cls, cfg: CellmConfig, out_dir: str | Path | None, *, progress: bool = False,
              logger: logging.Logger = _LOG) -> Session:
        """A new run of ``cfg`` into ``out_dir`` (None: no folder), which must not hold anything."""
        out = None if out_dir is None else Path(out_dir)
        check_new_folder(out)
        return cls(pin_threads(cfg), out, None, progress, logger)

    @classmethod
    def reopen(cls, out_dir: str | Path, *, runtime: str, cfg: CellmConfig | None = None, progress: bool = False,
               logger: logging.Logger = _LOG) -> Session:
        """The run in ``out_dir``, to continue from its checkpoint with the config recorded there (``cfg``, if
        given, must be that config). A runtime whose clients keep their own state cannot take over a checkpoint
        that holds client state (it would be dropped)."""
        out = Path(out_dir)
        saved, checkpoint = ckpt.read(out)
        if cfg is not None and _resolved_like(pin_threads(cfg), saved) != saved:
            raise ConfigError(f"cannot resume: the config given differs from {out / 'config.toml'}")
        if runtime != "embedded" and checkpoint.get("clients"):
            raise ConfigError(f"cannot resume {out} on {runtime}: its checkpoint holds client state from an "
                              "embedded run; resume it with `cellm resume`")
        return cls(saved, out, checkpoint, progress, logger)

    @property
    def resumed_round(self) -> int:
        return 0 if self.checkpoint is None else int(self.checkpoint["server"]["round"])

    def run(self, make_runner: MakeRunner, load: Callable[[CellmConfig], Setup] = load_setup) -> RunResult:
        """Run the rounds with the runner ``make_runner`` builds; return the result (the folder is final).

        ``data.num_clients = 0`` (auto) is resolved first, from the config where it tells (packaged data), else
        from the loaded data (every usable client of a natural partition of the user's files): the runner, the
        folder's config.toml, checkpoints and nodes all see the number, and the run logs it."""
        cfg = self.cfg
        known = known_clients(cfg)
        if known is not None:
            cfg = with_clients(cfg, known)
        with using_threads(cfg.run.threads):
            run_id = ckpt.run_id_of(self.checkpoint)
            setup = None
            if known is None:  # only the data tells how many clients there are: load it before anyone is told
                setup = load(cfg)
                cfg = with_clients(cfg, setup.data.num_clients)
            if cfg is not self.cfg:
                self.logger.info("data: %d clients (data.num_clients = 0 is every usable client)",
                                 cfg.data.num_clients)
                self.cfg = cfg
            runner = make_runner(cfg, run_id, self.resumed_round)
            if setup is None and runner.connects:  # load the model while the nodes answer (each starts a process)
                with ThreadPoolExecutor(max_workers=1) as pool:
                    loading = pool.submit(load, cfg)
                    try:
                        runner.connect()
                    finally:
                        setup = loading.result()
            else:
                setup = setup or load(cfg)  # AssetError / ConfigError surface here, before any file is written
                runner.connect()
            state, clients = None, {}
            if self.checkpoint is not None:
                state, clients = ckpt.restore(self.checkpoint, setup, cfg, runner.runtime)
                self.logger.info("resuming %s after round %d (run %s)", self.out_dir, state.round, run_id[:12])
            runner.attach(setup, clients)
            with new_run_folder(None if self.checkpoint is not None else self.out_dir, cfg):
                return self._drive(runner, setup, state, run_id)

    def _drive(self, runner: SessionRunner, setup: Setup, state: ServerState | None, run_id: str) -> RunResult:
        cfg, out_dir = self.cfg, self.out_dir
        metric, _ = primary_metric(setup.loaded.task)
        rec = RunRecorder(cfg, out_dir, metric, self.progress)
        if rec.bar is not None and state is not None:
            rec.bar.n = state.round

        def on_round(st: ServerState, row: dict[str, Any]) -> None:
            runner.on_row(row)
            rec.on_round(st, row)
            if out_dir is not None and ckpt.due(cfg, st.round):
                ckpt.save(out_dir, cfg, st, run_id, runner.runtime, runner.kept_clients())
                runner.checkpointed(st.round)

        try:
            state = drive(cfg, setup, runner, state=state, on_round=on_round)
        finally:
            rec.close()
        result = rec.finish(state, setup)
        runner.close()
        return result
