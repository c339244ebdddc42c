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
``query.secagg_advertise``, ``query.secagg_share``, ``query.secagg_unmask`` (secure aggregation, ``secagg.enabled``):
the SecAgg+ stages of this node's sampled clients (:mod:`cellm.core.secagg`). The node rebuilds the round's
parameters from its own config and the message's public fields (round, sampled clients, |S|) and refuses a message
whose parameters differ. Each client's protocol state (its secret keys, then the shares it holds for others) is
kept in ``context.state`` as bytes between messages and never sent; ``train`` masks each client's ring values with
it before the reply exists (:func:`cellm.runtime.clients.run_tasks`), and a task whose ring differs from what this
node's config says (or that asks for a plain upload under secure aggregation) is refused.

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

from cellm.config import CellmConfig, load_config
from cellm.core import secagg
from cellm.core.secagg import ClientAdvertised, ClientMasked, ClientShared, SecAggError, SecAggParams
from cellm.federated import secure
from cellm.federated.messages import ClientTask
from cellm.models.registry import check_assets
from cellm.runtime.clients import run_tasks, secure_advertise, secure_share, secure_unmask
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


def _config(context: Context, digest: str, what: str = "train message") -> CellmConfig:
    """The run's config this node was set up with, for a message of config ``digest`` (no model loaded)."""
    if P.STATE_CONFIG not in context.state.config_records:
        raise P.ProtocolError(f"this node got a {P.NOT_SET_UP}")
    rec = context.state.config_records[P.STATE_CONFIG]
    if rec.get("digest") != digest:
        raise P.ProtocolError(f"{what} is for config {digest[:12]} but this node was set up with "
                              f"{str(rec.get('digest'))[:12]}")
    cached = _SETUP_CACHE.get(digest)
    return cached[0] if cached is not None else _run_config(str(rec["config"]), context)


def _config_and_setup(context: Context, digest: str):
    """The run's config and this process's loaded setup (one model and data per process, kept across messages)."""
    _config(context, digest)
    rec = context.state.config_records[P.STATE_CONFIG]
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
    _check_ring(tasks, _config(context, digest))  # before anything loads
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
    ring = [t.client for t in tasks if t.ring_bits]
    params, states = _secure_states(context, cfg, tasks[0].round, ring, ClientShared, "train message") \
        if ring else (None, None)
    replies = run_tasks(setup_, cfg, tasks, store, states)  # each client's state saved at once, its outcome pending
    if params is not None and states is not None:  # masked: the state now holds only the shares kept for others
        _keep_secure(context, tasks[0].round, params, {c: states[c] for c in ring})
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
    if P.STATE_SECAGG in context.state:  # the last round's dropped clients' keys
        del context.state[P.STATE_SECAGG]
    return Message(content=RecordDict(), reply_to=msg)


# ------------------------------------------------------------------ secure aggregation

def _check_ring(tasks: list[ClientTask], cfg: CellmConfig) -> None:
    """Refuse tasks whose ring (bits, clip, round size) is not the one this node's config gives: a server cannot
    ask for a plain upload under secure aggregation, nor for another quantization than the run's."""
    want = ((cfg.secagg.value_bits, cfg.secagg.clip, secure.quant_spec(cfg).max_clients) if cfg.secagg.enabled
            else (0, 0.0, 0))
    bad = {t.client: (t.ring_bits, t.ring_clip, t.ring_clients) for t in tasks
           if (t.ring_bits, t.ring_clip, t.ring_clients) != want}
    if bad:
        raise P.ProtocolError(f"train message: the ring (ring_bits, ring_clip, ring_clients) of clients {bad} is "
                              f"not {want}, what this node's config says (secagg.enabled, secagg.value_bits, "
                              "secagg.clip, fl.clients_per_round)")
    if cfg.secagg.enabled and len({t.round for t in tasks}) > 1:
        raise P.ProtocolError(f"train message: tasks of rounds {sorted({t.round for t in tasks})}, not of one round")


def _max_state_bytes(params: SecAggParams) -> int:
    """The most bytes a client's stored protocol state takes in this round (keys, seed, peers or held shares)."""
    return 256 + 80 * (params.degree + 1)


def _keep_secure(context: Context, round_: int, params: SecAggParams, states: dict, fresh: bool = False) -> None:
    """Store ``states`` (client -> protocol state; None removes the client's) in ``context.state`` as bytes,
    beside the round's public parameters; ``fresh`` drops what was kept before (a new round's keys). Nothing left:
    the record goes."""
    rec = context.state.config_records.get(P.STATE_SECAGG)
    kept: dict[int, bytes] = {}
    if rec is not None and not fresh and rec.get("round") == round_:
        kept = dict(zip(rec["clients"], rec["states"], strict=True))
    for c, st in states.items():
        if st is None:
            kept.pop(c, None)
        else:
            kept[c] = secagg.client_state_to_bytes(st)
    if not kept:
        if P.STATE_SECAGG in context.state:
            del context.state[P.STATE_SECAGG]
        return
    clients = sorted(kept)
    context.state[P.STATE_SECAGG] = ConfigRecord({
        "round": int(round_), "round-clients": [int(c) for c in params.client_ids], "length": int(params.length),
        "params-digest": params.digest.hex(), "clients": [int(c) for c in clients], "states": [kept[c] for c in clients]})


def _secure_states(context: Context, cfg: CellmConfig, round_: int, clients: list[int], kind: type, what: str,
                   digest: str | None = None) -> tuple[SecAggParams, dict]:
    """The round's parameters (rebuilt from this node's config) and ``clients``' kept protocol states, each read
    back strictly (size first) and at stage ``kind``; ``digest``: the parameters a message names must match."""
    rec = context.state.config_records.get(P.STATE_SECAGG)
    if rec is None or rec.get("round") != round_:
        raise P.ProtocolError(f"{what}: this node holds no secure-aggregation keys for round {round_}")
    try:
        params = secure.round_params(cfg, round_, list(rec["round-clients"]), int(rec["length"]))
    except ValueError as exc:
        raise P.ProtocolError(f"{what}: the kept secure-aggregation state: {exc}") from None
    if params.digest.hex() != rec["params-digest"] or (digest is not None and digest != rec["params-digest"]):
        raise P.ProtocolError(f"{what}: the round's parameters are not those this node's clients made keys for")
    kept = dict(zip(rec["clients"], rec["states"], strict=True))
    limit, out = _max_state_bytes(params), {}
    for c in clients:
        blob = kept.get(c)
        if not isinstance(blob, bytes) or not 0 < len(blob) <= limit:
            raise P.ProtocolError(f"{what}: this node holds no secure-aggregation state of at most {limit} bytes "
                                  f"for client {c} in round {round_}")
        try:
            state = secagg.client_state_from_bytes(params, blob)
        except SecAggError as exc:
            raise P.ProtocolError(f"{what}: client {c}'s kept secure-aggregation state: {exc}") from None
        if not isinstance(state, kind) or state.client_id != c:
            raise P.ProtocolError(f"{what}: client {c}'s secure-aggregation state is at another stage of round "
                                  f"{round_} (a message came twice or out of order)")
        out[c] = state
    return params, out


def _secagg_stage(msg: Message, context: Context, stage: str) -> Message:
    """One SecAgg+ stage for this node's clients in the message (see the module docstring)."""
    q = P.read_secagg_query(msg.content, stage)
    what = f"secagg {stage} message"
    cfg = _config(context, q.config_digest, what)
    if not cfg.secagg.enabled:
        raise P.ProtocolError(f"{what}: this node's config has secagg.enabled = false")
    served = P.served_clients(_node_config(context), cfg.data.num_clients)
    strangers = [c for c in q.parts if c not in served]
    if strangers:
        raise P.ProtocolError(f"{what}: this node serves cellm clients {served}, not clients {strangers}")
    try:
        params = secure.round_params(cfg, q.round, q.round_clients, q.length)
    except ValueError as exc:
        raise P.ProtocolError(f"{what}: {exc}") from None
    if params.digest.hex() != q.params_digest:
        raise P.ProtocolError(f"{what}: the round's parameters differ from those this node's config gives "
                              "(seed, secagg.*, fl.clients_per_round)")
    clients = sorted(q.parts)
    try:
        if stage == "advertise":
            states: dict = {}
            out = secure_advertise(params, clients, states)
            _keep_secure(context, q.round, params, states, fresh=True)
        elif stage == "share":
            _, states = _secure_states(context, cfg, q.round, clients, ClientAdvertised, what, q.params_digest)
            out = secure_share(q.parts, states)
            _keep_secure(context, q.round, params, states)
        else:  # unmask: answered once; the shares held for others are gone after
            _, states = _secure_states(context, cfg, q.round, clients, ClientMasked, what, q.params_digest)
            out = secure_unmask(q.parts, states)
            _keep_secure(context, q.round, params, dict.fromkeys(clients))
    except SecAggError as exc:
        raise P.ProtocolError(f"{what}: {exc}") from None
    return Message(content=P.secagg_reply_content(stage, q.round, out), reply_to=msg)


@app.query("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    """Stage 1: fresh keys for this node's sampled clients; their public keys out."""
    return _secagg_stage(msg, context, "advertise")


@app.query("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    """Stage 2: each client's secrets shared among its neighbours, encrypted to each."""
    return _secagg_stage(msg, context, "share")


@app.query("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Stage 4: the shares that remove the round's masks (and nothing that unmasks one client)."""
    return _secagg_stage(msg, context, "unmask")
