"""Flower's simulation runtime (Ray), in process: ``cellm flower sim`` and :func:`run_flower_simulation`.

The ServerApp is bound to the config here; the ClientApps get it from the setup message, as on real SuperNodes.
Each virtual SuperNode ``i`` of ``n`` has node config ``partition-id=i num-partitions=n`` and so serves the cellm
clients ``c`` with ``c % n == i`` (by default ``n`` = number of cellm clients: one node per client).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cellm.config import CellmConfig, known_clients, with_clients
from cellm.runtime import checkpoint as ckpt
from cellm.runtime.flower import node_paths
from cellm.runtime.flower.server_app import DriverOptions, make_server_app
from cellm.runtime.setup import load_setup
from cellm.runtime.threads import pin_threads


def run_flower_simulation(cfg: CellmConfig | None, out: str | Path | None = None, *,
                          num_supernodes: int | None = None, workers: int | None = None,
                          torch_threads: int | None = None, progress: bool = False, verbose: bool = False,
                          options: DriverOptions | None = None, resume: bool = False):
    """Run ``cfg`` on Flower's simulation runtime; returns the same RunResult as :func:`cellm.run`. With
    ``resume`` (and ``cfg`` None), continue the run in ``out`` from its checkpoint.

    ``workers``: Ray actors training in parallel (each loads the model once); default min(clients per round,
    CPUs). ``num_supernodes``: virtual SuperNodes (default: one per cellm client). ``torch_threads``: sets
    ``run.threads`` when the config leaves it at 0; it is resolved here as ``cellm.run`` would resolve it, and the
    server and every worker's ClientApp train and evaluate with that count (bit-identical results need it).
    """
    if resume:
        if cfg is not None or out is None:
            raise ValueError("a resume takes the run folder (out) and no config")
        cfg, _ = ckpt.read(Path(out))  # checked here, before Ray starts
    elif cfg is None:
        raise ValueError("a new run needs a config")
    if torch_threads and cfg.run.threads == 0:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, threads=torch_threads))
    cfg = pin_threads(cfg)
    known = known_clients(cfg)
    if known is None:  # every usable client of a natural partition: only the data tells how many (one load more)
        known = load_setup(cfg).data.num_clients
    cfg = with_clients(cfg, known)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    from cellm.runtime.flower.client_app import app as client_app

    n = num_supernodes or cfg.data.num_clients
    w = workers or max(1, min(cfg.fl.clients_per_round, os.cpu_count() or 1))
    results: list = []
    opts = options or DriverOptions(node_wait_s=120.0, progress=progress)
    server_app = make_server_app(None if resume else cfg, out, opts, results, resume=resume)
    backend = {"init_args": {"num_cpus": w, "num_gpus": 0}, "client_resources": {"num_cpus": 1, "num_gpus": 0}}
    # The virtual nodes run on this machine: their own paths (node_paths) are the config's, given through the
    # environment that Ray's workers inherit.
    paths = {node_paths.env_name(key): str(getattr(getattr(cfg, section), name))
             for (section, name), key in node_paths.FIELDS.items()}
    saved = {k: os.environ.get(k) for k in paths}
    os.environ.update(paths)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n, backend_config=backend,
                       verbose_logging=verbose)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not results:
        raise RuntimeError("the Flower simulation ended without a result (see the log above for the error)")
    return results[0]
