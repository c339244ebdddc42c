"""The Flower ClientApp: one SuperNode serves one or more cellm clients and runs cellm's own client update.

Handlers
--------
``query`` (setup): stores the run's cellm config and run id in ``context.state`` and answers which cellm client
ids this node serves (its node config: ``partition-id``/``num-partitions``, or ``cellm-clients``).
``train`` (one message per round, with the tasks of this node's sampled clients): loads model and data once per
process (module cache); for each task restores the client's state (error-feedback residual, delta-mode copy) from
the node's disk (:mod:`cellm.runtime.flower.node_state`), calls :func:`cellm.federated.client.client_update` and
saves the new state at once (the round's outcome pending until the server's next task says whether it accepted
the upload); replies with the encoded uploads. Every field of the message is checked first
(:func:`cellm.runtime.flower.protocol.read_tasks`): a malformed task is an error that names the field, before
anything is trained or written.
``query.finish``: the run completed; removes its client state from the node's disk.

Node config keys read here (``flower-supernode --node-config '...'``): ``partition-id``, ``num-partitions``,
``cellm-clients``, ``torch-threads`` (or env ``CELLM_TORCH_THREADS``), and the node's own files: ``model-path``,
``data-path``, ``data-test-path``, ``cache-dir``, ``state-dir`` (default ``<cache dir>/node-state``: where clients'
state is kept between rounds, and across a ServerApp restart). The run's config never names a path on a node:
see :mod:`cellm.runtime.flower.node_paths`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from cellm.config import load_config
from cellm.models.registry import check_assets
from cellm.runtime.clients import run_tasks
from cellm.runtime.flower import protocol as P
from cellm.runtime.flower.node_paths import resolve as resolve_node_paths
from cellm.runtime.flower.node_state import NodeStateStore, RoundStore
from cellm.runtime.setup import load_setup
from cellm.runtime.stages import StageError, follow

app = ClientApp()

_SETUP_CACHE: dict[str, Any] = {}  # config digest -> (cfg, Setup): one model + data per process
_LOGGED_OVERRIDES: set[int] = set()
log = logging.getLogger(__name__)


def _threads(context: Context, run_threads: int) -> None:
    """Train with the run's thread count; a node override (``torch-threads``, env ``CELLM_TORCH_THREADS``) wins
    and is logged when it differs, since it makes this node's updates differ from an embedded run's at rounding
    level."""

    raw = context.node_config.get("torch-threads", os.environ.get("CELLM_TORCH_THREADS"))
    n = run_threads
    if raw not in (None, "", 0, "0"):
        override = int(raw)
        if override != run_threads and override not in _LOGGED_OVERRIDES:
            _LOGGED_OVERRIDES.add(override)
            log.warning("cellm: this node trains with %d torch threads (node override) while the run's "
                        "run.threads is %d; its updates are not bit-identical to a run at %d threads",
                        override, run_threads, run_threads)
        n = override
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _node_config(context: Context) -> dict[str, Any]:
    return dict(context.node_config)


def _run_config(text: str, context: Context):
    """The run's cellm config with this node's own paths (the server's are refused: see node_paths)."""
    return load_config(data=resolve_node_paths(tomllib.loads(text), context.node_config))


def _state_store(context: Context, cache_dir: str, run_id: str) -> NodeStateStore:
    """Where this node keeps its clients' state for the run (see the module docstring for the choice)."""
    root = context.node_config.get("state-dir") or os.environ.get("CELLM_NODE_STATE_DIR")
    if not root:
        base = context.node_config.get("cache-dir") or cache_dir
        root = Path(base) / "node-state" if base else Path(tempfile.gettempdir()) / "cellm-node-state"
    return NodeStateStore(str(root), run_id)


def _config_and_setup(context: Context, digest: str):
    """The run's config and this process's loaded setup (one model and data per process, kept across messages)."""
    if P.STATE_CONFIG not in context.state.config_records:
        raise P.ProtocolError(f"this node got a {P.NOT_SET_UP}")
    rec = context.state.config_records[P.STATE_CONFIG]
    if rec.get("digest") != digest:
        raise P.ProtocolError(f"train message is for config {digest[:12]} but this node was set up with "
                              f"{str(rec.get('digest'))[:12]}")
    if digest not in _SETUP_CACHE:
        cfg = _run_config(str(rec["config"]), context)
        _threads(context, cfg.run.threads)  # before the model is built
        _SETUP_CACHE.clear()
        _SETUP_CACHE[digest] = (cfg, load_setup(cfg))
    return _SETUP_CACHE[digest]


@app.query()
def setup(msg: Message, context: Context) -> Message:
    """Keep the run's config on this node; answer with the cellm clients this node serves.

    The config is validated and the model's assets checked here, so a node that cannot train says so at once.
    """
    text, digest, run_id = P.read_setup(msg.content)
    cfg = _run_config(text, context)
    check_assets(cfg.model.name, cfg.model.path)
    clients = P.served_clients(_node_config(context), cfg.data.num_clients)
    _state_store(context, cfg.data.cache_dir, run_id)  # a malformed run id fails here, not in training
    context.state[P.STATE_CONFIG] = ConfigRecord({"config": text, "digest": digest, P.RUN_ID: run_id})
    return Message(content=P.node_content(clients, _node_config(context)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """This node's cellm clients' round: for each task, decode the download, train, encode the upload."""
    tasks, digest, checkpoint_round = P.read_tasks(msg.content)
    cfg, setup_ = _config_and_setup(context, digest)
    _threads(context, cfg.run.threads)
    served = P.served_clients(_node_config(context), cfg.data.num_clients)
    strangers = [t.client for t in tasks if t.client not in served]
    if strangers:
        raise P.ProtocolError(f"this node serves cellm clients {served}, not clients {strangers}")
    limit = P.max_payload_bytes(setup_.flat.numel)
    big = [t.client for t in tasks if len(t.download) > limit]
    if big:
        raise P.ProtocolError(f"train message: downloads of clients {big} exceed the {limit} bytes any encoding of "
                              f"this node's {setup_.flat.numel}-entry vector takes")
    run_id = str(context.state.config_records[P.STATE_CONFIG][P.RUN_ID])
    try:
        follow(setup_, cfg, tasks[0].stage)  # SLoRA: the server has switched to LoRA (clients need no SVD)
    except StageError as exc:
        raise P.ProtocolError(f"train message: {exc}") from None
    store = RoundStore(_state_store(context, cfg.data.cache_dir, run_id), setup_.flat.numel, checkpoint_round)
    replies = run_tasks(setup_, cfg, tasks, store)  # each client's state saved at once, its outcome pending
    return Message(content=P.reply_content([(t.client, t.round, replies[t.client]) for t in tasks]), reply_to=msg)


@app.query("finish")
def finish(msg: Message, context: Context) -> Message:
    """The run completed: its clients' state on this node will not be needed again."""
    run_id = P.read_finish(msg.content)
    rec = context.state.config_records.get(P.STATE_CONFIG)
    if rec is None or rec.get(P.RUN_ID) != run_id:
        raise P.ProtocolError(f"finish message for run {run_id[:12]}, which this node was not set up for")
    cfg = _run_config(str(rec["config"]), context)
    _state_store(context, cfg.data.cache_dir, run_id).remove()
    return Message(content=RecordDict(), reply_to=msg)
