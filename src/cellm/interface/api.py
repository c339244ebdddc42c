"""The Python API: ``cellm.run(config) -> RunResult``, the same engine as ``cellm run``."""

from __future__ import annotations

import json
import shutil
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cellm.config import CellmConfig, load_config
from cellm.errors import ConfigError
from cellm.federated.client import ClientState
from cellm.federated.server import ServerState, model_weights
from cellm.interface import runfolder as rf
from cellm.models.evaluate import primary_metric
from cellm.runtime.embedded import Setup, Simulator, load_setup, simulate
from cellm.runtime.threads import pin_threads, using_threads


@dataclass
class RunResult:
    """What a run produced: its metrics rows, final evaluation, ledger totals and the trained adapter."""

    config: CellmConfig
    out_dir: Path | None
    metrics: list[dict[str, Any]]
    adapter: dict[str, torch.Tensor]  # PEFT state dict of the final (evaluated) adapter
    totals: dict[str, int]
    primary: str
    wall_s: float

    @property
    def final_eval(self) -> dict[str, float]:
        return next(r["eval"] for r in reversed(self.metrics) if "eval" in r)

    @property
    def initial_eval(self) -> dict[str, float]:
        return self.metrics[0]["eval"]

    @property
    def adapter_dir(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / rf.ADAPTER


def _as_config(config: CellmConfig | dict | str | Path | None) -> CellmConfig:
    if config is None:
        return load_config()
    if isinstance(config, CellmConfig):
        from cellm.config import validate

        validate(config)
        return config
    if isinstance(config, dict):
        return load_config(data=config)
    return load_config(config)


def default_out_dir(cfg: CellmConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model.name}-{cfg.data.name}-{stamp}"


def run(config: CellmConfig | dict | str | Path | None = None, out: str | Path | None = None, *,
        progress: bool = False, save: bool = True) -> RunResult:
    """Run a federated fine-tuning job; with ``save`` it writes a run folder (default runs/<model>-<data>-<time>).

    Everything that can fail on bad input (config, assets, an existing folder) fails before the folder exists.
    The run uses ``run.threads`` torch threads (resolved here when 0, and recorded in the folder's config);
    the caller's own thread count is restored afterwards.
    """
    cfg = pin_threads(_as_config(config))
    out_dir = Path(out) if out is not None else (default_out_dir(cfg) if save else None)
    if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"run folder {out_dir} already exists and is not empty; choose another --out")
    with using_threads(cfg.run.threads):
        return _start(cfg, out_dir, progress)


def _start(cfg: CellmConfig, out_dir: Path | None, progress: bool) -> RunResult:
    setup = load_setup(cfg)  # AssetError / ConfigError surface here, before any file is written
    created = False
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        created = True
        rf.atomic_write_text(out_dir / rf.CONFIG, cfg.to_toml())
    try:
        return _execute(cfg, setup, out_dir, progress)
    except BaseException:
        if created and not (out_dir / rf.METRICS).exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


class RunRecorder:
    """Writes a run folder as rounds complete; any runtime (embedded, Flower) calls it the same way."""

    def __init__(self, cfg: CellmConfig, out_dir: Path | None, metric: str, progress: bool) -> None:
        self.cfg, self.out_dir, self.metric = cfg, out_dir, metric
        self.t0 = time.perf_counter()
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.rounds, desc="rounds", unit="round", dynamic_ncols=True)

    def on_round(self, state: ServerState, row: dict[str, Any]) -> None:
        if self.out_dir is not None:
            rf.write_metrics(self.out_dir, state.metrics)
        if self.bar is not None:
            self.bar.n = row["round"]
            post = {"MB": f"{row['cum_bytes'] / 1e6:.2f}"}
            if row.get("train_loss") is not None:
                post["loss"] = f"{row['train_loss']:.3f}"
            last = next((r["eval"] for r in reversed(state.metrics) if "eval" in r), None)
            if last is not None:
                post[self.metric] = f"{last[self.metric]:.4g}"
            self.bar.set_postfix(post)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, state: ServerState, setup: Setup) -> RunResult:
        """Set the final (evaluated) adapter into the model, save it, the metrics, summary and plot."""
        self.close()
        cfg = self.cfg
        setup.flat.set(model_weights(state, cfg, state.round + 1))
        from peft import get_peft_model_state_dict

        adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(setup.lm.model).items()}
        result = RunResult(cfg, self.out_dir, state.metrics, adapter, state.ledger.totals(), self.metric,
                           time.perf_counter() - self.t0)
        if self.out_dir is not None:
            from cellm.interface.plot import plot_runs

            setup.lm.model.save_pretrained(str(self.out_dir / rf.ADAPTER))
            rf.write_metrics(self.out_dir, state.metrics)
            rf.atomic_write_text(self.out_dir / rf.SUMMARY, json.dumps(summary(result), indent=2, sort_keys=True))
            label = f"{cfg.model.name} d_down={cfg.comm.down_density:g} d_up={cfg.comm.up_density:g}"
            plot_runs([(label, state.metrics)], self.metric, self.out_dir / rf.PLOT,
                      title=f"{cfg.model.name} on {cfg.data.name}")
        return result


def _execute(cfg: CellmConfig, setup: Setup, out_dir: Path | None, progress: bool,
             checkpoint: dict[str, Any] | None = None) -> RunResult:
    metric, _ = primary_metric(setup.lm.task)
    rec = RunRecorder(cfg, out_dir, metric, progress)
    sim = Simulator(cfg, setup)
    state = None
    if checkpoint is not None:
        state = ServerState.from_state_dict(checkpoint["server"])
        if state.w0 is None:  # a checkpoint written before w0 was kept
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


def summary(result: RunResult) -> dict[str, Any]:
    m = result.primary
    return {
        "metric": m,
        "initial": result.initial_eval[m],
        "final": result.final_eval[m],
        "rounds": result.config.rounds,
        "down_bytes": result.totals["down_bytes"],
        "up_bytes": result.totals["up_bytes"],
        "total_bytes": result.totals["down_bytes"] + result.totals["up_bytes"],
        "down_nonzeros": result.totals["down_nonzeros"],
        "up_nonzeros": result.totals["up_nonzeros"],
        "wall_s": round(result.wall_s, 1),
    }
