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

``train`` (one per sampled client and round): ``cellm.download`` = ArrayRecord{payload}, ``cellm.task`` =
ConfigRecord{ClientTask scalars, codec_up.<field>, config-digest, checkpoint-round: the round the server's last
checkpoint holds}. Reply: ``cellm.upload`` = ArrayRecord{payload},
``cellm.reply`` = MetricRecord{num_examples, train_loss, nonzeros}, ``cellm.client`` = ConfigRecord{client, round}
(+ ``cellm.reply-extra`` ConfigRecord for ``ClientReply.extra`` scalars).
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


# ------------------------------------------------------------------ task

def _put_scalar(rec: ConfigRecord, key: str, value: Any, what: str) -> None:
    if not isinstance(value, _SCALARS):
        raise TypeError(f"{what}.{key} is {type(value).__name__}; the Flower protocol carries scalars only")
    rec[key] = value


def task_content(task: ClientTask, digest: str, checkpoint_round: int = 0) -> RecordDict:
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
    return RecordDict({DOWNLOAD: ArrayRecord({"payload": payload_array(task.download)}), TASK: rec})


def read_task(content: RecordDict) -> tuple[ClientTask, str, int]:
    """(ClientTask, config digest, the round of the server's last checkpoint) from a train message."""
    if TASK not in content.config_records:
        raise ProtocolError(f"train message has no '{TASK}' record")
    rec = content.config_records[TASK]
    kwargs: dict[str, Any] = {"download": _payload_of(content, DOWNLOAD)}
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
    digest = rec.get(CONFIG_DIGEST)
    if not isinstance(digest, str):
        raise ProtocolError("train message has no config digest")
    checkpoint_round = rec.get(CHECKPOINT_ROUND, 0)
    if not isinstance(checkpoint_round, int) or isinstance(checkpoint_round, bool) or checkpoint_round < 0:
        raise ProtocolError(f"train message: {CHECKPOINT_ROUND} must be an int >= 0, got {checkpoint_round!r}")
    return task, digest, checkpoint_round


# ------------------------------------------------------------------ reply

def reply_content(reply: ClientReply, client: int, round_: int) -> RecordDict:
    metrics = MetricRecord({"num_examples": int(reply.num_examples), "train_loss": float(reply.train_loss),
                            "nonzeros": int(reply.nonzeros)})
    content = RecordDict({UPLOAD: ArrayRecord({"payload": payload_array(reply.payload)}), REPLY: metrics,
                          CLIENT: ConfigRecord({"client": int(client), "round": int(round_)})})
    if reply.extra:
        extra = ConfigRecord()
        for k, v in reply.extra.items():
            _put_scalar(extra, str(k), v, "ClientReply.extra")
        content[REPLY_EXTRA] = extra
    return content


def read_reply(content: RecordDict) -> tuple[int, int, ClientReply]:
    """(client, round, ClientReply) from a train reply."""
    if REPLY not in content.metric_records or CLIENT not in content.config_records:
        raise ProtocolError(f"train reply lacks '{REPLY}' or '{CLIENT}' (records: {sorted(content.keys())})")
    m, who = content.metric_records[REPLY], content.config_records[CLIENT]
    extra = dict(content.config_records[REPLY_EXTRA]) if REPLY_EXTRA in content.config_records else {}
    reply = ClientReply(payload=_payload_of(content, UPLOAD), num_examples=int(m["num_examples"]),
                        train_loss=float(m["train_loss"]), nonzeros=int(m["nonzeros"]), extra=extra)
    return int(who["client"]), int(who["round"]), reply


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

