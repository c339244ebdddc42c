"""The Flower ServerApp: cellm's own server round, driven over a Flower ``Grid``.

Each round the driver calls :func:`cellm.federated.server.plan_round` (sampling, download mask, encoding, ledger),
sends each sampled client its task as one ``train`` Message addressed to the node that serves that client,
collects the replies, calls :func:`cellm.federated.server.finish_round` (strict decode, aggregate, server step,
ledger) and evaluates on the server's own model: the round loop is :func:`cellm.runtime.driver.drive`, the same
as the embedded runtime's, with :class:`CellmStrategy` as the way clients run; rounds are written with
:class:`cellm.runtime.record.RunRecorder`. There is no algorithm code here.

Why not ``flwr.serverapp.strategy.Strategy.start``: it sends one ArrayRecord of the global model per round and
expects every reply to share keys, while cellm sends per-client encoded payloads and one node may serve several
cellm clients. The strategy keeps Flower's template (``configure_train`` -> send -> ``collect``) and sends each
node one message a round with the tasks of all its sampled clients: a SuperNode starts a process (imports, model)
per message, so one message per node and round pays that once, and one base model trains the node's clients.

Run config (``[tool.flwr.app.config]``, override with ``flwr run ... --run-config``): ``config-toml`` (the whole
cellm config inline, what ``cellm flower run`` sends), or ``config`` (a TOML path on the SuperLink machine) and/or
``preset``, plus ``set`` (``;``-separated key=value overrides); ``out`` (run folder on the SuperLink machine; ""
= runs/<model>-<data>-<time> under the ServerApp's working directory; "-" = none); ``resume`` (true: continue the
run in ``out`` from its checkpoint, with the config recorded there; no config keys then); ``node-wait-s`` (how long
to wait until every cellm client is served by a connected node); ``round-timeout-s``; ``secagg-timeout-s`` (how
long a secure-aggregation stage waits for the nodes' answers).

Checkpoints and resume: the ServerApp writes the same atomic checkpoint as ``cellm run`` (every
``run.checkpoint_every`` rounds) into the run folder. The clients' own state (error-feedback residuals, delta-mode
copies) is not in it: each node keeps its clients' state on its disk per round
(:mod:`cellm.runtime.flower.node_state`), keyed by the run id that the checkpoint carries, so a resumed run on the
same nodes is exact in every mode.

A node is not trusted: a setup reply's claim is used only if its client ids are in range and no other live node
serves them (the first claim keeps a client); a node whose setup failed or was refused is asked again with a
doubling back-off. A train reply is used only from the node its message went to, for the current round, once, with
every field checked (:mod:`cellm.runtime.flower.protocol`); an error the SuperLink itself sends in place of a reply
(Flower does so for a message whose node went offline) counts as that node's failure, so a dead node's clients
fail as soon as Flower sees it offline instead of waiting out the round timeout. Whatever is refused is logged
and counted in the round's metrics row (``refused``: messages or uploads; a client whose reply was refused counts
as ``rejected``), and never reaches the model.

Secure aggregation (``secagg.enabled``): the round of :func:`cellm.runtime.driver.play_secure_round`, with each
SecAgg+ stage (advertise keys, share them, unmask) as one query message per node holding its sampled clients'
parts and the round's public parameters, which the node checks against its own config; the shares routed to a
client travel in its task. A stage answer is used only from the node its message went to, for that stage and
round, once, and each client's part only if it is a well-formed message of that client answering what it was
sent (:func:`cellm.runtime.flower.protocol.read_secagg_part`); anything else is refused and counted, and its client
treated as dropped, which the protocol recovers. The stage messages' Flower bytes are in the round's transport
columns.
"""

from __future__ import annotations

import logging
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp

from cellm.config import CellmConfig, load_config
from cellm.core.secagg import SecAggParams
from cellm.core.secagg.wire import parse_advertise
from cellm.errors import ConfigError
from cellm.federated.server import RoundPlan
from cellm.runtime.checkpoint import new_run_id
from cellm.runtime.flower import protocol as P
from cellm.runtime.flower.node_paths import for_nodes
from cellm.runtime.record import default_out_dir, summary
from cellm.runtime.session import Session

log = logging.getLogger("cellm.flower")


@dataclass(frozen=True)
class DriverOptions:
    node_wait_s: float = 300.0  # until every cellm client is served by some node
    round_timeout_s: float = 3600.0  # a client whose reply has not come by then is dropped for the round
    progress: bool = False
    poll_s: float = 1.0  # between looks for nodes that joined
    reply_poll_s: float = 0.25  # between looks for replies (Flower's own send_and_receive looks every 3 s)
    setup_retry_s: float = 5.0  # a node whose setup failed or was refused is asked again after this, doubling
    setup_retry_max_s: float = 300.0  # ... up to this
    secagg_timeout_s: float = 600.0  # secure aggregation: a node that has not answered a stage by then drops out


class CellmStrategy:
    """Drives cellm rounds over a Flower Grid; all round logic is :mod:`cellm.federated.server`."""

    def __init__(self, grid: Grid, cfg: CellmConfig, options: DriverOptions = DriverOptions(),
                 run_id: str | None = None, checkpoint_round: int = 0) -> None:
        self.grid, self.cfg, self.options = grid, cfg, options
        self.run_id = run_id or new_run_id()  # names this run's client state on the nodes, across resumes
        self.checkpoint_round = checkpoint_round  # the round of the last checkpoint written (0: none)
        self.transport: tuple[int, int] | None = None  # (down, up) bytes Flower serialized in the last round
        self.toml = for_nodes(cfg)  # what the nodes get: their own paths, never the server's (node_paths)
        self.digest = P.config_digest(self.toml)
        self.client_node: dict[int, int] = {}  # cellm client id -> Flower node id
        self.node_clients: dict[int, list[int]] = {}
        self.bad_nodes: dict[int, str] = {}
        self.asked: set[int] = set()  # nodes sent the setup message
        self.pending: dict[str, int] = {}  # setup message id -> node, not answered yet
        self.retry: dict[int, tuple[float, int]] = {}  # node whose setup failed -> (when to ask again, failures)
        self.started = False  # every client was served once (the first round may start)
        self.refused: list[str] = []  # messages (or parts) refused since the last metrics row, each logged
        self.refused_clients: list[int] = []  # the last round's clients whose reply was refused
        self.vector_size: Callable[[], int] | None = None  # the trained vector's entries (bounds an upload)
        self.clock: Callable[[], float] = time.monotonic  # when a refused node is asked again
        self.last_sent: dict[str, int] = {}  # the messages last pushed: id -> node
        self.secure_params: SecAggParams | None = None  # secure aggregation: the current round's parameters
        self.secure_round = 0  # ... and its number
        self.secure_transport = (0, 0)  # ... and the (down, up) Flower bytes of its stage messages so far
        self.secure_refused: set[int] = set()  # ... and the clients whose stage answer was refused (dropped)

    # -------------------------------------------------------------- nodes

    def missing_clients(self) -> list[int]:
        return [c for c in range(self.cfg.data.num_clients) if c not in self.client_node]

    def discover(self, grid: Grid, wait_s: float, require_all: bool = True) -> None:
        """Send the setup message to every node not asked yet; return once every cellm client has a node (at
        once with ``require_all`` False, after collecting the replies that have come).

        Replies are collected without blocking on silent nodes, so a dead node costs nothing once the clients
        are covered; a node that joins later is set up at the next round.
        """
        deadline = time.monotonic() + wait_s
        while True:
            online = set(grid.get_node_ids())
            self._forget_offline(online)
            now = self.clock()
            due = {n for n, (at, _) in self.retry.items() if at <= now and n in online}
            new = sorted((online - self.asked) | due)
            if new:
                msgs = [Message(P.setup_content(self.toml, self.run_id), dst_node_id=n, message_type=MessageType.QUERY,
                                group_id="setup") for n in new]
                pushed = _push(grid, msgs)
                self.pending.update(pushed)
                self.asked.update(new)
                for n in due:  # asked again: the next failure schedules the next try
                    self.retry[n] = (math.inf, self.retry[n][1])
                for n in sorted(set(new) - set(pushed.values())):
                    self._setup_failed(n, "its setup message could not be pushed")
            if self.pending:
                for reply in grid.pull_messages(list(self.pending)):
                    to, src = reply.metadata.reply_to_message_id, answering_node(reply, self.pending)
                    if self.pending.get(to) != src:  # the node it was sent to may still answer
                        self._refuse(f"a setup reply from node {src} to a message not sent to it (or answered)")
                        continue
                    del self.pending[to]
                    self._node_answered(reply, src)
            missing = self.missing_clients()
            if not missing or not require_all:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"no connected SuperNode serves cellm clients {missing} after {wait_s:.0f} s "
                    f"(nodes: {self.node_clients}; refused: {self.bad_nodes}; silent: "
                    f"{sorted(self.pending.values())}). Start SuperNodes whose node configs cover all "
                    f"{self.cfg.data.num_clients} clients, e.g. partition-id=i num-partitions=n for i in 0..n-1.")
            time.sleep(self.options.poll_s)

    def _refuse(self, what: str) -> None:
        """A message (or part of one) another party sent that the server does not use: logged and counted."""
        log.error("refused %s", what)
        self.refused.append(what)

    def take_refused(self) -> int:
        """How many refusals since the last call (each metrics row counts its own)."""
        n, self.refused = len(self.refused), []
        return n

    def _setup_failed(self, node: int, why: str) -> None:
        """Ask ``node`` again later, waiting twice as long after each failure (it may be restarting, or its
        claim may become free when the node that holds it goes offline)."""
        count = self.retry.get(node, (0.0, 0))[1] + 1
        delay = min(self.options.setup_retry_s * 2 ** (count - 1), self.options.setup_retry_max_s)
        self.retry[node] = (self.clock() + delay, count)
        self.bad_nodes[node] = why
        log.error("node %s is not set up (%s); asking it again in %.0f s", node, why, delay)

    def _node_answered(self, reply: Message, node: int) -> None:
        """Use ``node``'s setup reply if its claim holds: client ids in range, none served by another live node
        (the first node to claim a client keeps it)."""
        if reply.has_error():
            self._setup_failed(node, f"it failed the setup: {reply.error.reason}")
            return
        try:
            clients = P.read_node(reply.content, self.cfg.data.num_clients)
        except P.ProtocolError as exc:
            self._refuse(f"node {node}'s setup reply: {exc}")
            self._setup_failed(node, f"malformed setup reply: {exc}")
            return
        taken = {c: self.client_node[c] for c in clients if self.client_node.get(c, node) != node}
        if taken:
            self._refuse(f"node {node}'s claim of cellm clients served by other nodes ({taken})")
            self._setup_failed(node, f"it claims clients other nodes serve: {sorted(taken)}")
            return
        for c in self.node_clients.pop(node, []):  # set up again: its new claim replaces its old one
            if self.client_node.get(c) == node:
                del self.client_node[c]
        self.node_clients[node] = clients
        for c in clients:
            self.client_node[c] = node
        self.retry.pop(node, None)
        self.bad_nodes.pop(node, None)
        log.info("node %s serves cellm clients %s", node, clients)

    def _forget_offline(self, online: set[int]) -> None:
        """Nodes that went offline serve nothing: their clients are not sampled until a node claims them."""
        for n in sorted(n for n in self.node_clients if n not in online):
            self.asked.discard(n)  # if it comes back under the same id, it is set up again
            clients = self.node_clients.pop(n)
            for c in clients:
                if self.client_node.get(c) == n:
                    del self.client_node[c]
            log.warning("node %s is offline: its clients %s are not sampled until a node serves them again",
                        n, clients)

    # -------------------------------------------------------------- one round

    def configure_train(self, plan, grid: Grid, clients: list[int] | None = None) -> list[Message]:
        """One ``train`` Message per node, with the tasks of the sampled ``clients`` it serves. Each says from which
        round a resume could replay: without checkpoints, none (nodes keep only the newest state before it)."""
        keep = self.checkpoint_round if self.cfg.run.checkpoint_every else plan.round - 1
        per_node: dict[int, list[int]] = {}
        for c in plan.clients if clients is None else clients:
            per_node.setdefault(self.client_node[c], []).append(c)
        return [Message(P.task_content([plan.tasks[c] for c in cs], self.digest, keep), dst_node_id=n,
                        message_type=MessageType.TRAIN, group_id=str(plan.round)) for n, cs in per_node.items()]

    def collect(self, plan: RoundPlan, replies: list[Message], sent: list[int],
                sent_to: dict[int, int] | None = None, messages: dict[str, int] | None = None):
        """Check every reply before its uploads are used; return (replies by client, lost clients).

        A reply is used only if it answers a train message of this round (``messages``: message id -> the node it
        was sent to) from that node, once, and passes :func:`~cellm.runtime.flower.protocol.read_replies`; each
        upload in it only if its client was sent to that node (``sent_to``) for this round, once. Anything else
        is refused: logged and counted (:meth:`take_refused`), never used. A client whose node answers with an
        error counts as "failed", one whose reply was refused as "refused", one with no reply in time as "late".
        """
        sent_to = sent_to if sent_to is not None else {c: self.client_node[c] for c in sent if c in self.client_node}
        got: dict[int, Any] = {}
        answered: set[str] = set()
        node_failed: set[int] = set()
        refused: set[int] = set()
        numel = self.vector_size() if self.vector_size is not None else None
        for msg in replies:
            node = answering_node(msg, self.last_sent if messages is None else messages)
            to = msg.metadata.reply_to_message_id
            if messages is not None and (messages.get(to) != node or to in answered):
                self._refuse(f"round {plan.round}: a reply from node {node} to message {to[:16]!r}, which "
                             f"{'it answered already' if to in answered else 'was not sent to it this round'}")
                continue
            answered.add(to)
            mine = {c for c in sent if sent_to.get(c) == node}
            if msg.has_error():
                log.error("round %d: node %s failed: %s", plan.round, node, msg.error.reason)
                node_failed.add(node)
                if P.NOT_SET_UP in msg.error.reason:  # restarted under the same id: set it up again next round
                    self.asked.discard(node)
                continue
            try:
                uploads = P.read_replies(msg.content, num_clients=self.cfg.data.num_clients, numel=numel)
            except P.ProtocolError as exc:
                self._refuse(f"round {plan.round}: node {node}'s reply: {exc}")
                refused |= mine
                continue
            for client, round_, reply in uploads:
                if client not in mine:
                    why = "which was not sent to it this round"
                elif round_ != plan.round:
                    why = f"for round {round_}"
                elif client in got:
                    why = "a second time"
                else:
                    got[client] = reply
                    continue
                self._refuse(f"round {plan.round}: node {node}'s upload for client {client} {why}")
                if client in mine and client not in got:
                    refused.add(client)
        failed = {c for c in sent if c not in got and sent_to.get(c) in node_failed}
        lost = {c: ("failed" if c in failed else "refused" if c in refused else "late") for c in sent if c not in got}
        self.refused_clients = sorted(c for c, why in lost.items() if why == "refused")
        if lost:
            log.warning("round %d: no upload from clients %s", plan.round, lost)
        return got, lost

    # -------------------------------------------------------------- the session's runner

    runtime = "flower"
    connects = True  # the server's model loads while the nodes answer the setup message

    def connect(self) -> None:
        """Set up the nodes until every cellm client is served (up to ``node_wait_s``)."""
        self.discover(self.grid, self.options.node_wait_s)

    def attach(self, setup, clients: dict) -> None:
        """Uploads are bounded by the size of the vector being trained (SLoRA switches vectors)."""
        self.vector_size = lambda: setup.flat.numel

    def kept_clients(self) -> dict:
        """None: the nodes keep their clients' state on their own disks."""
        return {}

    def on_row(self, row: dict[str, Any]) -> None:
        """Count the refusals since the last row (messages or parts from nodes the server did not use)."""
        row["refused"] = self.take_refused()
        if row["round"] > 0:
            row["rejected"] = row.get("rejected", 0) + len(self.refused_clients)  # as a bad upload is
            loss = row.get("train_loss")
            log.info("round %d/%d: clients %s, %s bytes so far, loss %s, eval %s, %.1f s", row["round"],
                     self.cfg.rounds, row.get("clients"), row.get("cum_bytes"),
                     "-" if loss is None else f"{loss:.4f}", row.get("eval"), row["round_s"])

    def checkpointed(self, round_: int) -> None:
        """Nodes may forget client state older than the newest checkpoint (see :meth:`configure_train`)."""
        self.checkpoint_round = round_

    def close(self) -> None:
        """Tell the nodes the run completed; a failure here leaves their files, never the run's result."""
        try:
            self.finish()
        except Exception as exc:  # noqa: BLE001 - the run is complete and saved; only the nodes' cleanup failed
            log.warning("run finished, but telling the nodes failed (%s); their state dirs keep run %s",
                        exc, self.run_id[:12])

    # -------------------------------------------------------------- the driver's ClientRunner

    def prepare(self) -> None:
        """Before each round: set up nodes that joined (or came back), and note which nodes are offline.

        Before the first round every cellm client must be served (waiting up to ``node_wait_s``); later, clients
        whose node is offline are simply not sampled until a node serves them again, and the run waits only when
        no client at all can be reached."""
        if not self.started:
            self.discover(self.grid, self.options.node_wait_s)
            self.started = True
        deadline = time.monotonic() + self.options.node_wait_s
        while True:
            self.discover(self.grid, 0.0, require_all=False)  # forgets nodes that went offline
            if self.client_node:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no connected SuperNode serves any cellm client after {self.options.node_wait_s:.0f} s")
            time.sleep(self.options.poll_s)

    def available_clients(self) -> list[int] | None:
        """The clients served by an online node (None when that is all of them)."""
        if len(self.client_node) == self.cfg.data.num_clients:
            return None
        return sorted(self.client_node)

    def run_clients(self, plan: RoundPlan, arrived: list[int]):
        """Send the round's tasks (one message per node), collect the uploads; ``self.transport`` = the (down, up)
        bytes Flower serialized for every train message sent and every reply received."""
        messages = self.configure_train(plan, self.grid, arrived)
        sent_to = {c: m.metadata.dst_node_id for m in messages for c in m.content.config_records[P.TASKS][P.CLIENTS]}
        replies = self.send_and_receive(messages, self.options.round_timeout_s)
        self.transport = (sum(P.transport_size(m) for m in messages), sum(P.transport_size(r) for r in replies))
        got, lost = self.collect(plan, replies, arrived, sent_to, self.last_sent)
        if self.secure_params is not None and self.secure_round == plan.round:  # the stages' messages so far
            self.transport = _add(self.transport, self.secure_transport)
            self.refused_clients = sorted(set(self.refused_clients) | self.secure_refused)
        return got, lost

    # -------------------------------------------------------------- secure aggregation's stages

    def secure_advertise(self, round_: int, params: SecAggParams, clients: list[int]) -> dict[int, bytes]:
        """Stage 1: each node makes fresh keys for its sampled clients; returns their public keys by client.

        Every stage sends one query message per node with its clients' part and the round's public parameters
        (round, sampled clients, |S|); the node rebuilds the parameters from its own config and refuses them if
        they differ. A client whose answer is missing, malformed or not its own is dropped from the round (the
        protocol recovers dropped clients); a malformed one is logged and counted (``refused``)."""
        self.secure_round = round_
        self.secure_params, self.secure_transport, self.secure_refused = params, (0, 0), set()
        ads = self._secure_stage("advertise", {c: b"" for c in clients})
        keys: dict[bytes, list[int]] = {}
        for c, msg in ads.items():
            ad = parse_advertise(params, msg)
            for k in (ad.enc_pk, ad.mask_pk):
                keys.setdefault(k, []).append(c)
        for owners in keys.values():  # a key two clients claim belongs to neither (the protocol refuses copies)
            for c in owners if len(owners) > 1 else []:
                if ads.pop(c, None) is not None:
                    self._refuse(f"round {self.secure_round}: secagg advertise reply, client {c}: a public key "
                                 f"another client of the round also advertised ({sorted(owners)})")
                    self.secure_refused.add(c)
        return ads

    def secure_share(self, keys: dict[int, bytes]) -> dict[int, bytes]:
        """Stage 2: each client's shares, encrypted to the neighbours whose keys it was sent."""
        return self._secure_stage("share", keys)

    def secure_unmask(self, requests: dict[int, bytes]) -> dict[int, bytes]:
        """Stage 4: each asked client's shares that remove the round's masks; ``self.transport`` then holds every
        message of the round (stages and train)."""
        before = self.secure_transport
        answers = self._secure_stage("unmask", requests)
        self.transport = _add(self.transport or (0, 0), (self.secure_transport[0] - before[0],
                                                         self.secure_transport[1] - before[1]))
        return answers

    def _secure_stage(self, stage: str, inputs: dict[int, bytes]) -> dict[int, bytes]:
        """Send each node its clients' ``inputs`` for ``stage``; return the answers that pass every check, by
        client. A reply counts only from the node its message went to, for this stage and round, once."""
        params, round_ = self.secure_params, self.secure_round
        assert params is not None, "secure_advertise starts a secure round"
        per_node: dict[int, list[int]] = {}
        for c in sorted(inputs):
            node = self.client_node.get(c)
            if node is None:
                log.warning("round %d: secagg %s: client %d has no node now; it drops out", round_, stage, c)
                continue
            per_node.setdefault(node, []).append(c)
        messages = [Message(P.secagg_content(stage, round_, params, self.digest, {c: inputs[c] for c in cs}),
                            dst_node_id=n, message_type=P.SECAGG_TYPES[stage], group_id=str(round_))
                    for n, cs in per_node.items()]
        replies = self.send_and_receive(messages, self.options.secagg_timeout_s)
        self.secure_transport = _add(self.secure_transport, (sum(P.transport_size(m) for m in messages),
                                                             sum(P.transport_size(r) for r in replies)))
        out: dict[int, bytes] = {}
        answered: set[str] = set()
        for msg in replies:
            node, to = answering_node(msg, self.last_sent), msg.metadata.reply_to_message_id
            if self.last_sent.get(to) != node or to in answered:
                self._refuse(f"round {round_}: a secagg {stage} reply from node {node} to message {to[:16]!r}, "
                             f"which {'it answered already' if to in answered else 'was not sent to it'}")
                continue
            answered.add(to)
            mine = per_node[node]
            if msg.has_error():
                log.error("round %d: node %s failed the secagg %s stage: %s; its clients %s drop out", round_,
                          node, stage, msg.error.reason, mine)
                if P.NOT_SET_UP in msg.error.reason:
                    self.asked.discard(node)
                continue
            try:
                parts = P.read_secagg_reply(msg.content, stage, round_, params)
            except P.ProtocolError as exc:
                self._refuse(f"round {round_}: node {node}'s reply: {exc}")
                self._secure_dropped(stage, mine)
                continue
            for c, part in parts.items():
                if c not in mine:
                    self._refuse(f"round {round_}: node {node}'s secagg {stage} reply for client {c}, which was "
                                 "not sent to it")
                    continue
                try:
                    out[c] = P.read_secagg_part(params, stage, c, part, inputs[c])
                except P.ProtocolError as exc:
                    self._refuse(f"round {round_}: node {node}'s {exc}")
                    self._secure_dropped(stage, [c])
            left_out = [c for c in mine if c not in parts]
            if left_out:
                self._refuse(f"round {round_}: node {node}'s secagg {stage} reply leaves out its clients {left_out}")
                self._secure_dropped(stage, left_out)
        silent = sorted(n for n in per_node if n not in {self.last_sent.get(m) for m in answered})
        if silent:
            log.warning("round %d: nodes %s did not answer the secagg %s stage; their clients drop out",
                        round_, silent, stage)
        return out

    def _secure_dropped(self, stage: str, clients: list[int]) -> None:
        """Clients whose answer was refused before they trained count as rejected in the round's row (after
        training, the protocol still sums their masked vector: their neighbours' shares unmask it)."""
        if stage != "unmask":
            self.secure_refused.update(clients)

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        """Push ``messages`` and pull their replies until all have come or ``timeout`` has passed;
        ``self.last_sent`` maps the pushed messages' ids to their nodes."""
        self.last_sent = {}
        if not messages:
            return []
        self.last_sent = _push(self.grid, messages)
        pending = set(self.last_sent)
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(list(pending)))
            replies += got
            pending -= {r.metadata.reply_to_message_id for r in got  # a reply from another node answers nothing
                        if self.last_sent.get(r.metadata.reply_to_message_id) == answering_node(r, self.last_sent)}
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.options.reply_poll_s)
        return replies

    def finish(self, timeout: float = 30.0) -> None:
        """Tell every node that served this run that it completed, so it drops the run's client state; a node
        that does not answer in ``timeout`` keeps its files (the run's result does not depend on it)."""
        nodes = sorted(self.node_clients)
        msgs = [Message(P.finish_content(self.run_id), dst_node_id=n, message_type=P.FINISH_TYPE, group_id="finish")
                for n in nodes]
        replies = self.send_and_receive(msgs, timeout)
        bad = [answering_node(r, self.last_sent) for r in replies if r.has_error()]
        if len(replies) < len(msgs) or bad:
            log.warning("run finished, but %d of %d nodes did not confirm removing its client state (errors from %s)",
                        len(msgs) - len(replies) + len(bad), len(msgs), bad)


def answering_node(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply speaks for: its sender, except for an error the SuperLink itself made in place of a reply
    to a message in ``sent`` (message id -> node), which stands for the node that message went to. Flower answers
    so when a message's node went offline (two missed heartbeats); without this, a dead node's clients would wait
    out the whole round timeout. No node can send as the SuperLink: it stores a node's reply only from the node
    the message went to, and never gives a node the SuperLink's id."""
    src = reply.metadata.src_node_id
    if src == SUPERLINK_NODE_ID and reply.has_error():
        return sent.get(reply.metadata.reply_to_message_id, src)
    return src


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def _push(grid: Grid, messages: list[Message]) -> dict[str, int]:
    """Push ``messages``; return the ids of those pushed, each with the node it was sent to. Grids set each
    message's id as they push it (and may leave out one that failed), so the mapping does not rely on order."""
    ids = [i for i in grid.push_messages(messages) if i]
    by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    if not all(i in by_id for i in ids):  # a grid that sets no message ids: its ids come in message order
        by_id = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=False)}
    return {i: by_id[i] for i in ids}


# ------------------------------------------------------------------ the ServerApp

def run_server(grid: Grid, cfg: CellmConfig | None, out: str | Path | None,
               options: DriverOptions = DriverOptions(), *, resume: bool = False):
    """Run a cellm job over ``grid`` (a :class:`~cellm.runtime.session.Session` with :class:`CellmStrategy` as
    its runner); with ``out`` write the run folder (and checkpoints). With ``resume``, continue the run in ``out``
    from its checkpoint, with the config recorded there (``cfg`` must be None or the same). Returns a
    RunResult."""
    out_dir = Path(out) if out is not None else None
    if resume:
        if out_dir is None:
            raise ConfigError("resume needs the run folder (out) that holds the checkpoint")
        session = Session.reopen(out_dir, runtime="flower", cfg=cfg, progress=options.progress, logger=log)
    else:
        if cfg is None:
            raise ConfigError("a new run needs a config")
        session = Session.start(cfg, out_dir, progress=options.progress, logger=log)
    log.info("torch threads: %d (run.threads)", session.cfg.run.threads)  # the nodes get this count too
    if out_dir is not None:
        log.info("run folder: %s", out_dir.resolve())
    return session.run(lambda c, run_id, resumed: CellmStrategy(grid, c, options, run_id=run_id,
                                                                checkpoint_round=resumed))


def config_from_run_config(run_config: dict[str, Any]) -> tuple[CellmConfig | None, Path | None, DriverOptions]:
    """The cellm config, run folder and driver options from a Flower run config (see the module docstring).
    The config is None for a resume (it is read from the run folder)."""

    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    inline = str(run_config.get("config-toml", ""))
    if _resume_flag(run_config):
        out_s = str(run_config.get("out", ""))
        if out_s in ("", "-"):
            raise ConfigError("run config: resume = true needs out = the run folder to continue")
        if inline.strip() or overrides or str(run_config.get("config", "")) or str(run_config.get("preset", "")):
            raise ConfigError("run config: resume = true takes the config from the run folder; "
                              "leave config-toml, config, preset and set empty")
        return None, Path(out_s).absolute(), _options(run_config)
    if inline.strip():
        cfg = load_config(data=tomllib.loads(inline), overrides=overrides)
    else:
        path = str(run_config.get("config", "")) or None
        preset = str(run_config.get("preset", "")) or None
        cfg = load_config(path, preset=preset, overrides=overrides)
    out_s = str(run_config.get("out", ""))
    out = None if out_s == "-" else (Path(out_s) if out_s else default_out_dir(cfg)).absolute()
    return cfg, out, _options(run_config)


def _resume_flag(run_config: dict[str, Any]) -> bool:
    raw = run_config.get("resume", False)
    if isinstance(raw, str):
        if raw.strip().lower() not in ("", "true", "false"):
            raise ConfigError(f"run config: resume must be true or false, got {raw!r}")
        return raw.strip().lower() == "true"
    return bool(raw)


def _options(run_config: dict[str, Any]) -> DriverOptions:
    return DriverOptions(node_wait_s=float(run_config.get("node-wait-s", 300)),
                         round_timeout_s=float(run_config.get("round-timeout-s", 3600)),
                         secagg_timeout_s=float(run_config.get("secagg-timeout-s", 600)))


def _log_summary(result) -> None:
    s = summary(result)
    final = s["final"]
    log.info("cellm on Flower: %s %.4f -> %s after %d rounds; %d bytes on the wire (down %d, up %d); folder %s",
             s["metric"], s["initial"], "nan" if isinstance(final, float) and math.isnan(final) else f"{final:.4f}",
             s["rounds"], s["total_bytes"], s["down_bytes"], s["up_bytes"], result.out_dir)


def _setup_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s cellm: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment / ``flwr run`` entry: everything comes from the run config."""
    _setup_logging()
    run_config = dict(context.run_config)
    cfg, out, opts = config_from_run_config(run_config)
    _log_summary(run_server(grid, cfg, out, opts, resume=_resume_flag(run_config)))


def make_server_app(cfg: CellmConfig | None, out: str | Path | None, options: DriverOptions = DriverOptions(),
                    results: list | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp bound to ``cfg`` (for in-process simulation); the RunResult is appended to ``results``."""
    sapp = ServerApp()

    @sapp.main()
    def _main(grid: Grid, context: Context) -> None:
        _setup_logging()
        result = run_server(grid, cfg, out, options, resume=resume)
        if results is not None:
            results.append(result)
        _log_summary(result)

    return sapp
