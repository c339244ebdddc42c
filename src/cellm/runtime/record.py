"""A run's record: the run folder's life cycle, the files written as rounds complete, and the RunResult.

Every runtime (embedded, Flower) records a run through this module, so the folder looks the same whichever
ran it, and the interface layer only reads what is here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict

from cellm.config import CellmConfig, model_label
from cellm.errors import ConfigError
from cellm.federated.server import ServerState, model_weights
from cellm.runtime import runfolder as rf
from cellm.runtime.plot import plot_runs
from cellm.runtime.setup import Setup
from cellm.runtime.stages import stage_config


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


def default_out_dir(cfg: CellmConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{model_label(cfg)}-{cfg.data.name}-{stamp}"


def check_new_folder(out_dir: Path | None) -> None:
    """A run never writes into a folder that holds anything: ConfigError before any work starts."""
    if out_dir is not None and out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"run folder {out_dir} already exists and is not empty; choose another out folder (--out)")


@contextmanager
def new_run_folder(out_dir: Path | None, cfg: CellmConfig) -> Iterator[None]:
    """Create ``out_dir`` with the resolved config; if the body fails before any metrics, remove it again."""
    if out_dir is None:
        yield
        return
    check_new_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rf.atomic_write_text(out_dir / rf.CONFIG, cfg.to_toml())
    try:
        yield
    except BaseException:
        if not (out_dir / rf.METRICS).exists():
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
        setup.flat.set(model_weights(state, stage_config(cfg, state.stage), state.round + 1))
        with _no_base_config_warning():
            adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(setup.loaded.model).items()}
        result = RunResult(cfg, self.out_dir, state.metrics, adapter, state.ledger.totals(), self.metric,
                           time.perf_counter() - self.t0)
        if self.out_dir is not None:
            with _no_base_config_warning():
                setup.loaded.model.save_pretrained(str(self.out_dir / rf.ADAPTER))
            if setup.data.label_names:  # a classifier's class names, for `cellm generate` and `cellm export`
                rf.atomic_write_text(self.out_dir / rf.LABELS, json.dumps(setup.data.label_names))
            rf.write_metrics(self.out_dir, state.metrics)
            rf.atomic_write_text(self.out_dir / rf.SUMMARY, json.dumps(summary(result), indent=2, sort_keys=True))
            label = f"{model_label(cfg)} d_down={cfg.comm.down_density:g} d_up={cfg.comm.up_density:g}"
            plot_runs([(label, state.metrics)], self.metric, self.out_dir / rf.PLOT,
                      title=f"{model_label(cfg)} on {cfg.data.name}")
        return result


@contextlib.contextmanager
def _no_base_config_warning() -> Iterator[None]:
    """peft looks for the base model's config.json when it reads or saves the adapter; a GGUF package has none."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not find a config file")
        yield


def summary(result: RunResult) -> dict[str, Any]:
    m = result.primary
    return {
        "metric": m,
        "initial": result.initial_eval[m],
        "final": result.final_eval[m],
        "rounds": result.config.rounds,
        "clients": result.config.data.num_clients,
        "down_bytes": result.totals["down_bytes"],
        "up_bytes": result.totals["up_bytes"],
        "total_bytes": result.totals["down_bytes"] + result.totals["up_bytes"],
        "down_nonzeros": result.totals["down_nonzeros"],
        "up_nonzeros": result.totals["up_nonzeros"],
        "wall_s": round(result.wall_s, 1),
    }
