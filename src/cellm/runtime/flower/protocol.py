"""How cellm's round objects travel in Flower messages, and which cellm clients a Flower node serves.

Pure translation, no algorithm: a :class:`~cellm.federated.client.ClientTask` becomes a ``RecordDict`` holding its
encoded download as one uint8 ``Array`` whose ``data`` *is* the cellm payload (no NumPy header, so
``ArrayRecord.count_bytes()`` is the payload length plus the key) and a ``ConfigRecord`` with the round's scalar
fields; a :class:`~cellm.federated.client.ClientReply` comes back the same way. Fields are mapped generically
from the dataclasses, so a field added to the core travels without edits here (scalars only; anything else
raises ``TypeError`` loudly).

Messages
--------
``query`` (setup, once per node and Flower run): ``cellm.setup`` = ConfigRecord{config: the resolved cellm config
TOML, digest: its sha256, run-id: the cellm run's id, kept across a resume}. The reply's ``cellm.node``
ConfigRecord lists the cellm client ids the node serves.

``query.finish`` (once per node, when the run has completed): ``cellm.finish`` = ConfigRecord{run-id}; the node
removes the run's client state. Empty reply.

``train`` (one per node and round, holding the round's tasks of every sampled cellm client the node serves, so a
node starts one process a round, not one per client): for each such client ``c``, ``cellm.download.<c>`` =
ArrayRecord{payload} and ``cellm.task.<c>`` = ConfigRecord{ClientTask scalars, codec_up.<field>, config-digest,
checkpoint-round: the round the server's last checkpoint holds}. Reply, for each task: ``cellm.upload.<c>`` =
ArrayRecord{payload}, ``cellm.reply.<c>`` = MetricRecord{num_examples, train_loss, nonzeros}, ``cellm.client.<c>``
= ConfigRecord{client, round} (+ ``cellm.reply-extra.<c>`` ConfigRecord for ``ClientReply.extra`` scalars).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from cellm.core.codec import CodecSpec
from cellm.federated.client import ClientReply, ClientTask

PAYLOAD_STYPE = "cellm.payload"  # Array.data is the raw cellm message (dtype uint8, shape (len,))
SETUP, NODE, FINISH = "cellm.setup", "cellm.node", "cellm.finish"
FINISH_TYPE = "query.finish"  # message type of the end-of-run message
DOWNLOAD, TASK = "cellm.download", "cellm.task"
UPLOAD, REPLY, CLIENT, REPLY_EXTRA = "cellm.upload", "cellm.reply", "cellm.client", "cellm.reply-extra"
CONFIG_DIGEST, CHECKPOINT_ROUND, RUN_ID = "config-digest", "checkpoint-round", "run-id"
NOT_SET_UP = "train message before the run's setup message"  # a node that lost its setup (restarted) says so
STATE_CONFIG = "cellm.config"  # context.state key of the node's cellm config (set by the setup message)
_SCALARS = (bool, int, float, str)


class ProtocolError(ValueError):
    """A Flower message that does not carry what cellm expects (wrong keys, wrong types, wrong client)."""


# ------------------------------------------------------------------ payload bytes <-> Array

def payload_array(payload: bytes) -> Array:
    """The encoded cellm message as a uint8 Array: ``data`` holds exactly these bytes."""
    return Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=bytes(payload))


def array_payload(arr: Array) -> bytes:
    if arr.stype != PAYLOAD_STYPE or arr.dtype != "uint8" or tuple(arr.shape) != (len(arr.data),):
        raise ProtocolError(f"expected a cellm payload array, got stype={arr.stype!r} dtype={arr.dtype!r} "
                            f"shape={tuple(arr.shape)} with {len(arr.data)} bytes")
    return bytes(arr.data)


def _payload_of(content: RecordDict, key: str) -> bytes:
    if key not in content.array_records or "payload" not in content.array_records[key]:
        raise ProtocolError(f"message has no '{key}' payload (records: {sorted(content.keys())})")
    return array_payload(content.array_records[key]["payload"])


# ------------------------------------------------------------------ config

def config_digest(toml_text: str) -> str:
    return hashlib.sha256(toml_text.encode()).hexdigest()


def setup_content(toml_text: str, run_id: str) -> RecordDict:
    return RecordDict({SETUP: ConfigRecord({"config": toml_text, "digest": config_digest(toml_text),
                                            RUN_ID: run_id})})


def read_setup(content: RecordDict) -> tuple[str, str, str]:
    """(config TOML, digest, run id) from a setup message; the digest is checked."""
    if SETUP not in content.config_records:
        raise ProtocolError(f"setup message has no '{SETUP}' record")
    rec = content.config_records[SETUP]
    text, digest, run_id = rec.get("config"), rec.get("digest"), rec.get(RUN_ID)
    if not isinstance(text, str) or digest != config_digest(text):
        raise ProtocolError("setup message: config digest does not match its TOML")
    if not isinstance(run_id, str) or not run_id:
        raise ProtocolError(f"setup message has no '{RUN_ID}'")
    return text, digest, run_id


def finish_content(run_id: str) -> RecordDict:
    return RecordDict({FINISH: ConfigRecord({RUN_ID: run_id})})


def read_finish(content: RecordDict) -> str:
    run_id = content.config_records[FINISH].get(RUN_ID) if FINISH in content.config_records else None
    if not isinstance(run_id, str) or not run_id:
        raise ProtocolError(f"finish message has no '{FINISH}' record with a '{RUN_ID}'")
    return run_id


# ------------------------------------------------------------------ tasks (one message per node and round)

def _put_scalar(rec: ConfigRecord, key: str, value: Any, what: str) -> None:
    if not isinstance(value, _SCALARS):
        raise TypeError(f"{what}.{key} is {type(value).__name__}; the Flower protocol carries scalars only")
    rec[key] = value


def _client_of(key: str, base: str) -> int | None:
    """The client id in a record key ``<base>.<client>``; None for other keys."""
    head, _, tail = key.rpartition(".")
    if head != base:
        return None
    if not tail.isdigit():
        raise ProtocolError(f"record key {key!r}: expected {base}.<client id>")
    return int(tail)


def task_content(tasks: ClientTask | list[ClientTask], digest: str, checkpoint_round: int = 0) -> RecordDict:
    """The train message for one node: the round's tasks of the cellm clients it serves."""
    content = RecordDict()
    for task in [tasks] if isinstance(tasks, ClientTask) else tasks:
        rec = ConfigRecord()
        for f in dataclasses.fields(ClientTask):
            value = getattr(task, f.name)
            if f.name == "download":
                continue
            if isinstance(value, CodecSpec):
                for g in dataclasses.fields(CodecSpec):
                    _put_scalar(rec, f"{f.name}.{g.name}", getattr(value, g.name), "ClientTask")
            else:
                _put_scalar(rec, f.name, value, "ClientTask")
        rec[CONFIG_DIGEST] = digest
        rec[CHECKPOINT_ROUND] = int(checkpoint_round)
        content[f"{DOWNLOAD}.{task.client}"] = ArrayRecord({"payload": payload_array(task.download)})
        content[f"{TASK}.{task.client}"] = rec
    return content


def _read_one_task(content: RecordDict, client: int) -> tuple[ClientTask, str, int]:
    rec = content.config_records[f"{TASK}.{client}"]
    kwargs: dict[str, Any] = {"download": _payload_of(content, f"{DOWNLOAD}.{client}")}
    for f in dataclasses.fields(ClientTask):
        if f.name == "download":
            continue
        prefix = f"{f.name}."
        nested = {k[len(prefix):]: v for k, v in rec.items() if k.startswith(prefix)}
        if nested:
            kwargs[f.name] = CodecSpec(**nested)
        elif f.name in rec:
            kwargs[f.name] = rec[f.name]
    try:
        task = ClientTask(**kwargs)
    except TypeError as exc:
        raise ProtocolError(f"train message: {exc}") from None
    if task.client != client:
        raise ProtocolError(f"train message: record {TASK}.{client} holds client {task.client}'s task")
    digest = rec.get(CONFIG_DIGEST)
    if not isinstance(digest, str):
        raise ProtocolError("train message has no config digest")
    checkpoint_round = rec.get(CHECKPOINT_ROUND, 0)
    if not isinstance(checkpoint_round, int) or isinstance(checkpoint_round, bool) or checkpoint_round < 0:
        raise ProtocolError(f"train message: {CHECKPOINT_ROUND} must be an int >= 0, got {checkpoint_round!r}")
    return task, digest, checkpoint_round


def read_tasks(content: RecordDict) -> tuple[list[ClientTask], str, int]:
    """(tasks, config digest, the round of the server's last checkpoint) from a train message."""
    clients = sorted(c for k in content.config_records if (c := _client_of(k, TASK)) is not None)
    if not clients:
        raise ProtocolError(f"train message has no '{TASK}.<client>' record (records: {sorted(content.keys())})")
    read = [_read_one_task(content, c) for c in clients]
    if len({(d, k) for _, d, k in read}) != 1:
        raise ProtocolError("train message: its tasks disagree on the config digest or checkpoint round")
    return [t for t, _, _ in read], read[0][1], read[0][2]


# ------------------------------------------------------------------ replies

def reply_content(replies: list[tuple[int, int, ClientReply]]) -> RecordDict:
    """A node's reply: (client, round, ClientReply) for each task it was sent."""
    content = RecordDict()
    for client, round_, reply in replies:
        content[f"{UPLOAD}.{client}"] = ArrayRecord({"payload": payload_array(reply.payload)})
        content[f"{REPLY}.{client}"] = MetricRecord({"num_examples": int(reply.num_examples),
                                                     "train_loss": float(reply.train_loss),
                                                     "nonzeros": int(reply.nonzeros)})
        content[f"{CLIENT}.{client}"] = ConfigRecord({"client": int(client), "round": int(round_)})
        if reply.extra:
            extra = ConfigRecord()
            for k, v in reply.extra.items():
                _put_scalar(extra, str(k), v, "ClientReply.extra")
            content[f"{REPLY_EXTRA}.{client}"] = extra
    return content


def read_replies(content: RecordDict) -> list[tuple[int, int, ClientReply]]:
    """[(client, round, ClientReply)] from a node's train reply."""
    clients = sorted(c for k in content.config_records if (c := _client_of(k, CLIENT)) is not None)
    if not clients:
        raise ProtocolError(f"train reply has no '{CLIENT}.<client>' record (records: {sorted(content.keys())})")
    out = []
    for c in clients:
        if f"{REPLY}.{c}" not in content.metric_records:
            raise ProtocolError(f"train reply lacks '{REPLY}.{c}'")
        m, who = content.metric_records[f"{REPLY}.{c}"], content.config_records[f"{CLIENT}.{c}"]
        extra_key = f"{REPLY_EXTRA}.{c}"
        extra = dict(content.config_records[extra_key]) if extra_key in content.config_records else {}
        try:
            reply = ClientReply(payload=_payload_of(content, f"{UPLOAD}.{c}"), num_examples=int(m["num_examples"]),
                                train_loss=float(m["train_loss"]), nonzeros=int(m["nonzeros"]), extra=extra)
            client, round_ = int(who["client"]), int(who["round"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"train reply for client {c}: {exc!r}") from None
        if client != c:
            raise ProtocolError(f"train reply: record {CLIENT}.{c} names client {client}")
        out.append((client, round_, reply))
    return out


# ------------------------------------------------------------------ node -> cellm clients

def served_clients(node_config: dict[str, Any], num_clients: int) -> list[int]:
    """The cellm client ids a Flower node serves, from its node config.

    ``cellm-clients = "0,3,7"`` lists them; otherwise ``partition-id = p`` and ``num-partitions = n`` serve
    every client ``c`` with ``c % n == p`` (Flower's simulation sets these two for each virtual node).
    """
    if "cellm-clients" in node_config:
        raw = str(node_config["cellm-clients"]).replace(" ", "")
        try:
            ids = sorted({int(x) for x in raw.split(",") if x})
        except ValueError:
            raise ProtocolError(f"node config cellm-clients must be comma-separated ints, got {raw!r}") from None
        bad = [c for c in ids if not 0 <= c < num_clients]
        if bad:
            raise ProtocolError(f"node config cellm-clients has ids outside [0, {num_clients}): {bad}")
        return ids
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ProtocolError("node config must set partition-id and num-partitions (or cellm-clients), e.g. "
                            "--node-config 'partition-id=0 num-partitions=2'")
    p, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if n < 1 or not 0 <= p < n:
        raise ProtocolError(f"node config needs 0 <= partition-id < num-partitions, got {p} and {n}")
    return [c for c in range(num_clients) if c % n == p]


def node_content(clients: list[int], node_config: dict[str, Any]) -> RecordDict:
    desc = " ".join(f"{k}={v}" for k, v in sorted(node_config.items()))
    return RecordDict({NODE: ConfigRecord({"clients": [int(c) for c in clients], "node-config": desc})})


def read_node(content: RecordDict) -> list[int]:
    if NODE not in content.config_records:
        raise ProtocolError(f"setup reply has no '{NODE}' record")
    clients = content.config_records[NODE].get("clients", [])
    return [int(c) for c in clients]


# ------------------------------------------------------------------ what a message costs on the wire

def transport_size(msg: Any) -> int:
    """Bytes Flower serializes for ``msg`` (a Message or a RecordDict): every object of its tree (the message, its
    records, its arrays)
    deflated as Flower pushes them to the SuperLink, headers and metadata included. gRPC's own framing (a few
    bytes a frame) is not counted."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())

